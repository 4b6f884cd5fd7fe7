package pipeline

import (
	"errors"
	"fmt"
	"time"

	"github.com/visionserve/visionserve/pkg/batcher"
	"github.com/visionserve/visionserve/pkg/engine"
)

// The batch items: a prepared image as the dynamic batcher takes it
// (batcher.Item). The batcher's worker fills the image into its slot and
// hands each item its output row, so a request enters this package once
// to decode and the worker once per batch.

// ResultItem is one image whose batch output row becomes its Result.
type ResultItem struct {
	p    *Prepared
	post *Postprocessor
	opts Options
	res  Result // set by Postprocess
}

// NewResultItem queues p to be decoded by post with opts (resolved).
func NewResultItem(p *Prepared, post *Postprocessor, opts Options) *ResultItem {
	return &ResultItem{p: p, post: post, opts: opts}
}

// Fill implements batcher.Item.
func (it *ResultItem) Fill(slot []float32) error { return it.p.Fill(slot) }

// Postprocess implements batcher.Item: it decodes row i and records the
// run's stage timings, backend and batch size.
func (it *ResultItem) Postprocess(outputs []engine.Tensor, i int, run batcher.Run) error {
	start := time.Now()
	res, err := it.post.Decode(outputs, i, it.p, it.opts)
	if err != nil {
		return err
	}
	res.Timings.Queue = run.Queue
	res.Timings.Preprocess += run.Fill
	res.Timings.Inference = run.Inference
	res.Timings.Postprocess = time.Since(start)
	res.Backend = run.Backend
	res.BatchSize = run.Size
	it.res = res
	return nil
}

// Result is the image's result once the batcher returned.
func (it *ResultItem) Result() Result { return it.res }

// RawItem is one image whose batch output rows are copied out as they
// are.
type RawItem struct {
	p    *Prepared
	rows []engine.Tensor // one per output, batch dimension 1
	// Timings are the image's stage timings, set by Postprocess
	// (Postprocess is the copy of its rows).
	Timings StageTimings
}

// NewRawItem queues p for its raw outputs.
func NewRawItem(p *Prepared) *RawItem { return &RawItem{p: p} }

// Fill implements batcher.Item.
func (it *RawItem) Fill(slot []float32) error { return it.p.Fill(slot) }

// Postprocess implements batcher.Item: it copies row i of every output.
func (it *RawItem) Postprocess(outputs []engine.Tensor, i int, run batcher.Run) error {
	start := time.Now()
	defer func() {
		it.Timings = StageTimings{Decode: it.p.Decode, Preprocess: it.p.Preprocess + run.Fill, Queue: run.Queue,
			Inference: run.Inference, Postprocess: time.Since(start)}
	}()
	it.rows = make([]engine.Tensor, len(outputs))
	for k, t := range outputs {
		if len(t.Shape) == 0 || t.Shape[0] <= int64(i) {
			return fmt.Errorf("output %q of shape %v has no row %d", t.Name, t.Shape, i)
		}
		per := len(t.Data) / int(t.Shape[0])
		row := make([]float32, per)
		copy(row, t.Data[i*per:(i+1)*per])
		shape := append([]int64{1}, t.Shape[1:]...)
		it.rows[k] = engine.Tensor{Name: t.Name, Shape: shape, Data: row}
	}
	return nil
}

// StackRows concatenates the items' output rows along the batch
// dimension, in order, so the result equals one engine run on all of
// them.
func StackRows(raw []*RawItem) ([]engine.Tensor, error) {
	if len(raw) == 0 {
		return nil, nil
	}
	outs := make([]engine.Tensor, len(raw[0].rows))
	for k, first := range raw[0].rows {
		shape := append([]int64{int64(len(raw))}, first.Shape[1:]...)
		data := make([]float32, 0, len(first.Data)*len(raw))
		for _, it := range raw {
			if len(it.rows) != len(outs) || len(it.rows[k].Data) != len(first.Data) {
				return nil, errors.New("engine outputs differ in shape between batches")
			}
			data = append(data, it.rows[k].Data...)
		}
		outs[k] = engine.Tensor{Name: first.Name, Shape: shape, Data: data}
	}
	return outs, nil
}
