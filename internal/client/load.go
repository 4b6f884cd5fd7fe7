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

	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// LoadReport is what a load run measured.
type LoadReport struct {
	Requests, Errors int
	Elapsed          time.Duration
	P50, P90, P99    time.Duration
	// ErrorCodes counts the failures by gRPC code.
	ErrorCodes map[string]int
}

// Throughput is the successful requests per second.
func (r LoadReport) Throughput() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Requests-r.Errors) / r.Elapsed.Seconds()
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
	fmt.Fprintf(stdout, "throughput %.1f req/s  latency p50 %v  p90 %v  p99 %v\n", rep.Throughput(),
		rep.P50.Round(10*time.Microsecond), rep.P90.Round(10*time.Microsecond), rep.P99.Round(10*time.Microsecond))
	if len(rep.ErrorCodes) > 0 {
		fmt.Fprintf(stdout, "errors by code: %v\n", rep.ErrorCodes)
	}
	return nil
}

// Load calls call from o.Concurrency goroutines until o.Duration passed or
// o.Requests calls were started, and measures each call. Every goroutine
// has exited when it returns.
func Load(ctx context.Context, o Options, call func(context.Context) error, progress io.Writer) LoadReport {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if o.Duration > 0 {
		ctx, cancel = context.WithTimeout(ctx, o.Duration)
		defer cancel()
	}
	var (
		started atomic.Int64
		done    atomic.Int64
		mu      sync.Mutex // guards the fields below
		lat     []time.Duration
		codes   = map[string]int{}
	)
	begin := time.Now()
	end := begin.Add(o.Duration)
	// over is checked by time as well as by ctx: the timer that ends ctx
	// may fire late on a busy machine, while calls made after the
	// deadline already fail at once.
	over := func() bool { return ctx.Err() != nil || (o.Duration > 0 && !time.Now().Before(end)) }
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
			for !over() {
				if o.Requests > 0 && started.Add(1) > int64(o.Requests) {
					return
				}
				t := time.Now()
				err := call(ctx)
				d := time.Since(t)
				if err != nil && over() {
					return // the run ended under this call
				}
				mu.Lock()
				lat = append(lat, d)
				if err != nil {
					codes[status.Code(err).String()]++
				}
				mu.Unlock()
				done.Add(1)
			}
		})
	}
	wg.Wait()
	close(stopBar)
	<-barDone
	rep := LoadReport{Requests: len(lat), Elapsed: time.Since(begin), ErrorCodes: codes}
	for _, n := range codes {
		rep.Errors += n
	}
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
