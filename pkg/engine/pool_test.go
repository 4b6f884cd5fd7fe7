package engine_test

import (
	"testing"

	"github.com/visionserve/visionserve/pkg/engine"
)

func TestBatchPool(t *testing.T) {
	p, err := engine.NewBatchPool(2, 3, 4, 5, 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := p.Get()
	b, _ := p.Get()
	if a == b || len(a.Data) != 2*3*4*5 || a.SlotSize() != 60 {
		t.Fatalf("bad batches %p %p len %d", a, b, len(a.Data))
	}
	a.N = 2
	p.Put(a)
	p.Put(b) // beyond maxIdle: dropped
	c, _ := p.Get()
	if c != a || c.N != 0 {
		t.Errorf("Get did not reuse the idle batch (or left N=%d)", c.N)
	}
	p.Close()
	if _, err := p.Get(); err == nil {
		t.Error("Get after Close: no error")
	}
	if _, err := engine.NewBatchPool(0, 3, 4, 5, 1, nil); err == nil {
		t.Error("zero capacity: no error")
	}
}
