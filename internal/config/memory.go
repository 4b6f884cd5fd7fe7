package config

import (
	"strconv"
	"strings"
)

// DefaultDecodeBudget is the decode memory budget where the container
// sets no memory limit.
const DefaultDecodeBudget = 2 << 30

// MemoryLimit reads the memory limit of the process's container from the
// cgroup file system (v2's memory.max, else v1's memory.limit_in_bytes),
// through read (os.ReadFile); 0 means none was found or there is no
// limit.
func MemoryLimit(read func(string) ([]byte, error)) int64 {
	for _, p := range []string{"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"} {
		b, err := read(p)
		if err != nil {
			continue
		}
		s := strings.TrimSpace(string(b))
		if s == "max" {
			return 0
		}
		n, err := strconv.ParseInt(s, 10, 64)
		// cgroup v1 says "no limit" with a number near the largest page-
		// aligned int64.
		if err != nil || n <= 0 || n >= 1<<60 {
			return 0
		}
		return n
	}
	return 0
}

// DecodeBudgetFor is the default decode memory budget under a memory
// limit of limit bytes (0: none): a quarter of it, leaving the rest to
// the engines, the messages in flight and the runtime; without a limit
// DefaultDecodeBudget. Never less than what one image of maxPixels
// takes decoded, so that every image the limits allow can be decoded
// alone.
func DecodeBudgetFor(limit int64, maxPixels int) int {
	b := int64(DefaultDecodeBudget)
	if limit > 0 {
		b = limit / 4
	}
	return int(max(b, int64(maxPixels)*3))
}
