package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/status"

	"github.com/visionserve/visionserve/proto/inference"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// LoadReport is what a load run measured.
type LoadReport struct {
	// Requests counts the calls answered, Errors those that failed; the
	// percentiles are of their latencies.
	Requests, Errors int
	// Late counts the calls of Requests that were still running when the
	// measurement window ended and were answered after it, LateErrors
	// those of them that failed. Their latencies are in the percentiles
	// (leaving them out would drop the calls most likely to be long),
	// but Throughput does not count them.
	Late, LateErrors int
	// Canceled counts the calls cut short because ctx ended: not answered,
	// so in none of the above.
	Canceled int
	// Elapsed is the measurement window: until --duration passed, or
	// until the last call was answered when that came first.
	Elapsed       time.Duration
	P50, P90, P99 time.Duration
	// ErrorCodes counts the failures by gRPC code.
	ErrorCodes map[string]int
}

// Throughput is the successful requests answered within the window, per
// second.
func (r LoadReport) Throughput() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Requests-r.Errors-(r.Late-r.LateErrors)) / r.Elapsed.Seconds()
}

// runLoad sends one image over and over from o.Concurrency clients for
// o.Duration or until o.Requests were sent, drawing a progress bar on
// stderr, and prints throughput and latency percentiles.
func runLoad(ctx context.Context, c visionv1.VisionServiceClient, o Options, file string, stderr, stdout io.Writer) error {
	if o.Duration <= 0 && o.Requests <= 0 {
		return errors.New("load needs --duration or --requests")
	}
	data, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	infoCtx, cancel := context.WithTimeout(ctx, o.Timeout)
	info, err := c.ModelInfo(infoCtx, &visionv1.ModelInfoRequest{Model: o.Model})
	cancel()
	if err != nil {
		return err
	}
	task := "classify"
	if info.Task == visionv1.Task_TASK_DETECT {
		task = "detect"
	}
	rep := Load(ctx, o, func(ctx context.Context) error {
		_, err := infer(ctx, c, task, o, []*visionv1.Image{{Source: &visionv1.Image_Encoded{Encoded: data}}})
		return err
	}, stderr)
	fmt.Fprintf(stdout, "model %s (%s, %s): %d requests, %d errors in %v\n", o.Model, task, info.Backend, rep.Requests, rep.Errors, rep.Elapsed.Round(time.Millisecond))
	if rep.Late > 0 || rep.Canceled > 0 {
		fmt.Fprintf(stdout, "%d answered after the window (%d errors), not in throughput; %d canceled\n", rep.Late, rep.LateErrors, rep.Canceled)
	}
	fmt.Fprintf(stdout, "throughput %.1f req/s  latency p50 %v  p90 %v  p99 %v\n", rep.Throughput(),
		rep.P50.Round(10*time.Microsecond), rep.P90.Round(10*time.Microsecond), rep.P99.Round(10*time.Microsecond))
	if len(rep.ErrorCodes) > 0 {
		fmt.Fprintf(stdout, "errors by code: %v\n", rep.ErrorCodes)
	}
	return nil
}

// runTensorLoad is runLoad through the Open Inference Protocol: each call
// is a ModelInfer of one zero FP32 input at the model's input shape, sent
// raw, the load perf_analyzer --input-data zero makes.
func runTensorLoad(ctx context.Context, c inference.GRPCInferenceServiceClient, o Options, stderr, stdout io.Writer) error {
	if o.Duration <= 0 && o.Requests <= 0 {
		return errors.New("load needs --duration or --requests")
	}
	mdCtx, cancel := context.WithTimeout(ctx, o.Timeout)
	md, err := c.ModelMetadata(mdCtx, &inference.ModelMetadataRequest{Name: o.Model})
	cancel()
	if err != nil {
		return err
	}
	if len(md.GetInputs()) != 1 || md.GetInputs()[0].GetDatatype() != "FP32" {
		return fmt.Errorf("model %s: want one FP32 input, metadata says %v", o.Model, md.GetInputs())
	}
	in := md.GetInputs()[0]
	shape := append([]int64{1}, in.GetShape()[1:]...)
	n := int64(1)
	for _, d := range shape {
		if d < 1 {
			return fmt.Errorf("model %s: input shape %v is not fixed", o.Model, in.GetShape())
		}
		n *= d
	}
	req := &inference.ModelInferRequest{
		ModelName:        o.Model,
		Inputs:           []*inference.ModelInferRequest_InferInputTensor{{Name: in.GetName(), Datatype: "FP32", Shape: shape}},
		RawInputContents: [][]byte{make([]byte, 4*n)},
	}
	rep := Load(ctx, o, func(ctx context.Context) error {
		_, err := c.ModelInfer(ctx, req)
		return err
	}, stderr)
	fmt.Fprintf(stdout, "model %s (ModelInfer, FP32 %v zeros): %d requests, %d errors in %v\n", o.Model, shape, rep.Requests, rep.Errors, rep.Elapsed.Round(time.Millisecond))
	fmt.Fprintf(stdout, "throughput %.1f req/s  latency p50 %v  p90 %v  p99 %v\n", rep.Throughput(),
		rep.P50.Round(10*time.Microsecond), rep.P90.Round(10*time.Microsecond), rep.P99.Round(10*time.Microsecond))
	if len(rep.ErrorCodes) > 0 {
		fmt.Fprintf(stdout, "errors by code: %v\n", rep.ErrorCodes)
	}
	return nil
}

// Load calls call from o.Concurrency goroutines until o.Duration passed or
// o.Requests calls were started, and measures each call. The end of the
// window does not cancel the calls still running: Load waits for them and
// reports them as Late, so that every call started is accounted for
// (only an end of ctx cuts calls short, counted as Canceled). Every
// goroutine has exited when it returns.
func Load(ctx context.Context, o Options, call func(context.Context) error, progress io.Writer) LoadReport {
	var (
		started atomic.Int64
		done    atomic.Int64
		mu      sync.Mutex // guards the fields below
		lat     []time.Duration
		codes   = map[string]int{}
		rep     = LoadReport{ErrorCodes: codes}
	)
	begin := time.Now()
	end := begin.Add(o.Duration)
	// over says whether the window ended, by the clock rather than by a
	// timer, which may fire late on a busy machine.
	over := func(t time.Time) bool { return o.Duration > 0 && !t.Before(end) }
	stopBar := make(chan struct{})
	barDone := make(chan struct{})
	go func() {
		defer close(barDone)
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				drawBar(progress, o, done.Load(), time.Since(begin))
			case <-stopBar:
				drawBar(progress, o, done.Load(), time.Since(begin))
				fmt.Fprintln(progress)
				return
			}
		}
	}()
	var wg sync.WaitGroup
	for range max(o.Concurrency, 1) {
		wg.Go(func() {
			for ctx.Err() == nil && !over(time.Now()) {
				if o.Requests > 0 && started.Add(1) > int64(o.Requests) {
					return
				}
				t := time.Now()
				err := call(ctx)
				answered := time.Now()
				mu.Lock()
				switch {
				case err != nil && ctx.Err() != nil:
					rep.Canceled++ // cut short by ctx: no answer to measure
				default:
					lat = append(lat, answered.Sub(t))
					if err != nil {
						codes[status.Code(err).String()]++
						rep.Errors++
					}
					if over(answered) {
						rep.Late++
						if err != nil {
							rep.LateErrors++
						}
					}
					done.Add(1)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	// The window is --duration, or shorter when the calls stopped first
	// (--requests ran out, ctx ended); waiting for the late calls is not
	// part of it.
	rep.Elapsed = time.Since(begin)
	if o.Duration > 0 {
		rep.Elapsed = min(rep.Elapsed, o.Duration)
	}
	close(stopBar)
	<-barDone
	rep.Requests = len(lat)
	slices.Sort(lat)
	pct := func(p float64) time.Duration {
		if len(lat) == 0 {
			return 0
		}
		return lat[min(len(lat)-1, int(p*float64(len(lat))))]
	}
	rep.P50, rep.P90, rep.P99 = pct(0.50), pct(0.90), pct(0.99)
	return rep
}

// drawBar redraws the progress line: a bar toward --requests or
// --duration, the count and the rate so far.
func drawBar(w io.Writer, o Options, n int64, elapsed time.Duration) {
	frac := 0.0
	if o.Requests > 0 {
		frac = float64(n) / float64(o.Requests)
	} else if o.Duration > 0 {
		frac = elapsed.Seconds() / o.Duration.Seconds()
	}
	frac = min(max(frac, 0), 1)
	const width = 30
	fill := int(frac * width)
	rate := float64(n) / max(elapsed.Seconds(), 1e-9)
	fmt.Fprintf(w, "\r[%s%s] %3.0f%% %d requests %.1f req/s", strings.Repeat("=", fill), strings.Repeat(" ", width-fill), frac*100, n, rate)
}
