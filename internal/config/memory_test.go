package config

import (
	"errors"
	"testing"
)

func TestMemoryLimitAndDecodeBudget(t *testing.T) {
	files := func(m map[string]string) func(string) ([]byte, error) {
		return func(p string) ([]byte, error) {
			if s, ok := m[p]; ok {
				return []byte(s), nil
			}
			return nil, errors.New("no such file")
		}
	}
	for _, c := range []struct {
		name  string
		files map[string]string
		limit int64
	}{
		{"v2 limit", map[string]string{"/sys/fs/cgroup/memory.max": "4294967296\n"}, 4 << 30},
		{"v2 no limit", map[string]string{"/sys/fs/cgroup/memory.max": "max\n"}, 0},
		{"v1 limit", map[string]string{"/sys/fs/cgroup/memory/memory.limit_in_bytes": "2147483648\n"}, 2 << 30},
		{"v1 no limit", map[string]string{"/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n"}, 0},
		{"no cgroup", nil, 0},
		{"garbage", map[string]string{"/sys/fs/cgroup/memory.max": "lots"}, 0},
	} {
		if got := MemoryLimit(files(c.files)); got != c.limit {
			t.Errorf("%s: limit %d, want %d", c.name, got, c.limit)
		}
	}
	if got := DecodeBudgetFor(4<<30, 40_000_000); got != 1<<30 {
		t.Errorf("4 GiB limit: budget %d, want a quarter", got)
	}
	if got := DecodeBudgetFor(0, 40_000_000); got != DefaultDecodeBudget {
		t.Errorf("no limit: budget %d", got)
	}
	if got := DecodeBudgetFor(256<<20, 40_000_000); got != 120_000_000 {
		t.Errorf("small limit: budget %d, want one image of max pixels", got)
	}
}
