package main

import (
	"context"
	"io"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc/status"

	"github.com/visionserve/visionserve/internal/client"
)

// Modes of a sweep point.
const (
	ModeClosed = "closed" // N clients, each sending its next request when the last returned
	ModeOpen   = "open"   // requests sent at a fixed rate whatever the answers
)

// Point is one step of a sweep: a load held for a while and what it gave.
type Point struct {
	Mode string `json:"mode"`
	// Concurrency is the number of clients (closed loop).
	Concurrency int `json:"concurrency,omitempty"`
	// Rate is the offered requests per second (open loop).
	Rate float64 `json:"rate,omitempty"`
	// Requests answered (successes and errors) and Errors among them.
	Requests int `json:"requests"`
	Errors   int `json:"errors"`
	// Dropped counts open-loop requests never sent because MaxInFlight
	// were outstanding: the client could not offer the rate.
	Dropped int `json:"dropped,omitempty"`
	// Throughput is successful images per second (one image a request).
	Throughput float64 `json:"throughput"`
	// Latency percentiles of answered requests; open-loop latencies run
	// from the scheduled send time, so a late send counts against the
	// server (no coordinated omission).
	P50 time.Duration `json:"p50_ns"`
	P90 time.Duration `json:"p90_ns"`
	P99 time.Duration `json:"p99_ns"`
	// ErrorCodes counts failures by gRPC code.
	ErrorCodes map[string]int `json:"error_codes,omitempty"`
	Elapsed    time.Duration  `json:"elapsed_ns"`
}

// Label is the point's load, for tables and plots.
func (p Point) Label() string {
	if p.Mode == ModeOpen {
		return "rate " + trimFloat(p.Rate) + "/s"
	}
	return "conc " + itoa(p.Concurrency)
}

// closedLoop holds concurrency clients for d with client.Load.
func closedLoop(ctx context.Context, concurrency int, d time.Duration, call func(context.Context) error, progress io.Writer) Point {
	rep := client.Load(ctx, client.Options{Concurrency: concurrency, Duration: d}, call, progress)
	return Point{
		Mode: ModeClosed, Concurrency: concurrency, Requests: rep.Requests, Errors: rep.Errors,
		Throughput: rep.Throughput(), P50: rep.P50, P90: rep.P90, P99: rep.P99,
		ErrorCodes: rep.ErrorCodes, Elapsed: rep.Elapsed,
	}
}

// openLoop sends requests evenly spaced at rate per second for d, each on
// its own goroutine, at most maxInFlight outstanding (the rest are counted
// as dropped), and waits for every answer. Every goroutine it starts has
// exited when it returns.
func openLoop(ctx context.Context, rate float64, d time.Duration, maxInFlight int, call func(context.Context) error) Point {
	p := Point{Mode: ModeOpen, Rate: rate}
	if rate <= 0 || d <= 0 {
		return p
	}
	interval := time.Duration(float64(time.Second) / rate)
	sem := make(chan struct{}, max(maxInFlight, 1))
	var (
		mu    sync.Mutex // guards the fields below
		lat   []time.Duration
		codes = map[string]int{}
	)
	var wg sync.WaitGroup
	timer := time.NewTimer(0)
	defer timer.Stop()
	<-timer.C
	start := time.Now()
	for i := 0; ; i++ {
		at := start.Add(time.Duration(i) * interval)
		if at.Sub(start) >= d {
			break
		}
		if wait := time.Until(at); wait > 0 {
			timer.Reset(wait)
			select {
			case <-timer.C:
			case <-ctx.Done():
			}
		}
		if ctx.Err() != nil {
			break
		}
		select {
		case sem <- struct{}{}:
		default:
			p.Dropped++
			continue
		}
		wg.Go(func() {
			defer func() { <-sem }()
			err := call(ctx)
			l := time.Since(at)
			if err != nil && ctx.Err() != nil {
				return // the run was cancelled under this call
			}
			mu.Lock()
			defer mu.Unlock()
			lat = append(lat, l)
			if err != nil {
				codes[status.Code(err).String()]++
			}
		})
	}
	wg.Wait()
	p.Elapsed = time.Since(start)
	p.Requests = len(lat)
	for _, n := range codes {
		p.Errors += n
	}
	if len(codes) > 0 {
		p.ErrorCodes = codes
	}
	p.Throughput = float64(p.Requests-p.Errors) / p.Elapsed.Seconds()
	p.P50, p.P90, p.P99 = percentiles(lat)
	return p
}

// percentiles returns the p50, p90 and p99 of lat (sorted in place).
func percentiles(lat []time.Duration) (p50, p90, p99 time.Duration) {
	if len(lat) == 0 {
		return 0, 0, 0
	}
	slices.Sort(lat)
	pct := func(p float64) time.Duration { return lat[min(len(lat)-1, int(p*float64(len(lat))))] }
	return pct(0.50), pct(0.90), pct(0.99)
}

// peak is the highest successful throughput among points.
func peak(points []Point) float64 {
	best := 0.0
	for _, p := range points {
		best = max(best, p.Throughput)
	}
	return best
}
