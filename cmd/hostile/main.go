// Command hostile attacks a real infer-server binary on loopback the way
// an operator does before trusting it, and reports the figures of the
// hostile-traffic goals (benchmarks/RESULTS.md) as markdown:
//
//   - overload: the closed-loop peak, then an open-loop flood at -flood
//     times it with real photos for -duration: goodput, the latency of
//     the ResourceExhausted answers, the server's RSS peak over idle, and
//     the p50 right after the flood against the quiet p50;
//   - slow: four streams of tiny frames that never read, for -slow-for:
//     RSS growth, and whether unary calls are still answered meanwhile;
//   - unauth: a server with --auth-token flooded by callers without the
//     token, sending bodies just under the message limit and gzip bombs
//     that expand to it, for -duration: RSS growth;
//   - churn: -churn streams that vanish mid-flight: the in-flight gauge
//     and the goroutine count afterwards.
//
// Each scenario starts its own server (-server, with the flags it needs)
// on a repository holding one model (-model of -model-repo), so that RSS
// is the server's alone.
//
//	hostile -server bin/infer-server -model-repo models -model mobilenetv3_large [-scenarios overload,slow,unauth,churn]
package main

import (
	"bufio"
	"bytes"
	gz "compress/gzip"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/status"

	"github.com/visionserve/visionserve/internal/config"
	"github.com/visionserve/visionserve/internal/machine"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

type options struct {
	server, repo, model, image, backend string
	scenarios                           []string
	duration, slowFor                   time.Duration
	flood                               float64
	churn                               int
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var o options
	fs := flag.NewFlagSet("hostile", flag.ExitOnError)
	fs.StringVar(&o.server, "server", "bin/infer-server", "the infer-server binary")
	fs.StringVar(&o.repo, "model-repo", "models", "model repository holding -model")
	fs.StringVar(&o.model, "model", "mobilenetv3_large", "classifier to serve")
	fs.StringVar(&o.image, "image", "../shared/testdata/images/dog.jpg", "photo sent to the classifier")
	fs.StringVar(&o.backend, "backend", "ort-cpu", "backend of the server")
	scen := fs.String("scenarios", "overload,slow,unauth,churn", "scenarios to run")
	fs.DurationVar(&o.duration, "duration", 30*time.Second, "flood length (overload, unauth)")
	fs.DurationVar(&o.slowFor, "slow-for", 60*time.Second, "slow-consumer length")
	fs.Float64Var(&o.flood, "flood", 5, "overload rate as a multiple of the closed-loop peak")
	fs.IntVar(&o.churn, "churn", 10000, "streams that vanish (churn)")
	_ = fs.Parse(os.Args[1:])
	o.scenarios = strings.Split(*scen, ",")
	if err := run(ctx, o, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "hostile:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, o options, out, log io.Writer) error {
	img, err := os.ReadFile(o.image)
	if err != nil {
		return err
	}
	repo, err := os.MkdirTemp("", "hostile-repo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(repo)
	abs, err := filepath.Abs(filepath.Join(o.repo, o.model))
	if err != nil {
		return err
	}
	if err := os.CopyFS(filepath.Join(repo, o.model), os.DirFS(abs)); err != nil {
		return err
	}
	fmt.Fprintf(out, "# Hostile traffic, %s\n\n", time.Now().UTC().Format("2006-01-02 15:04 UTC"))
	fmt.Fprintf(out, "Command: `hostile %s`  \nMachine: %d CPUs (%s/%s), load %s  \nModel: %s on %s, image %s (%d bytes)\n\n",
		strings.Join(os.Args[1:], " "), runtime.NumCPU(), runtime.GOOS, runtime.GOARCH, machine.LoadAvg(), o.model, o.backend, o.image, len(img))
	for _, s := range o.scenarios {
		fmt.Fprintf(log, "scenario %s\n", s)
		var err error
		switch s {
		case "overload":
			err = overload(ctx, o, repo, img, out)
		case "slow":
			err = slowConsumer(ctx, o, repo, img, out)
		case "unauth":
			err = unauthFlood(ctx, o, repo, out)
		case "churn":
			err = churn(ctx, o, repo, out)
		default:
			err = fmt.Errorf("unknown scenario %q", s)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", s, err)
		}
	}
	return nil
}

// server is one infer-server process.
type server struct {
	cmd        *exec.Cmd
	exited     chan error // Wait's answer, once the process ended
	grpc, http string
	conns      []*grpc.ClientConn
	clients    []visionv1.VisionServiceClient
	next       atomic.Uint64
	client     visionv1.VisionServiceClient // the first connection's
	stderr     *syncBuffer
}

// syncBuffer keeps what the server writes to stderr, for errors.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func freePort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// startServer runs the binary on repo with extra flags and waits until it
// is ready.
func startServer(ctx context.Context, o options, repo string, extra ...string) (*server, error) {
	g, err := freePort()
	if err != nil {
		return nil, err
	}
	h, err := freePort()
	if err != nil {
		return nil, err
	}
	args := append([]string{"--model-repo", repo, "--backend", o.backend, "--grpc-addr", g, "--http-addr", h, "--log-level", "warn"}, extra...)
	cmd := exec.Command(o.server, args...)
	stderr := &syncBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s := &server{cmd: cmd, exited: make(chan error, 1), grpc: g, http: h, stderr: stderr}
	go func() { s.exited <- cmd.Wait() }()
	deadline := time.Now().Add(5 * time.Minute)
	for {
		select {
		case err := <-s.exited:
			s.exited <- err
			return nil, fmt.Errorf("server exited (%v): %s", err, stderr.String())
		default:
		}
		resp, err := http.Get("http://" + h + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			s.stop()
			return nil, fmt.Errorf("server not ready: %s", stderr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Many clients are many connections: unary load is spread over 8, so
	// that one HTTP/2 connection's writer is not what is measured.
	for range 8 {
		conn, err := grpc.NewClient(g, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(1<<30)))
		if err != nil {
			s.stop()
			return nil, err
		}
		s.conns = append(s.conns, conn)
		s.clients = append(s.clients, visionv1.NewVisionServiceClient(conn))
	}
	s.client = s.clients[0]
	return s, nil
}

// stop ends the server with SIGTERM and returns its exit error.
func (s *server) stop() error {
	for _, c := range s.conns {
		c.Close()
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-s.exited:
		s.exited <- err
		return err
	case <-time.After(2 * time.Minute):
		_ = s.cmd.Process.Kill()
		return errors.New("did not exit within 2 minutes of SIGTERM")
	}
}

// cpu is the CPU time the server has used (user and system).
func (s *server) cpu() time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", s.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	return parseStatCPU(string(b))
}

// parseStatCPU reads utime and stime (fields 14 and 15, in clock ticks
// of 1/100 s) from /proc/PID/stat, whose second field may hold spaces.
func parseStatCPU(stat string) time.Duration {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(stat[i+1:])
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseInt(f[11], 10, 64)
	k, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(u+k) * 10 * time.Millisecond
}

// selfCPU is the CPU time this process has used.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// rss is the server's resident set size in bytes.
func (s *server) rss() uint64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", s.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	return parseVmRSS(f)
}

func parseVmRSS(r io.Reader) uint64 {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) >= 1 {
				kb, _ := strconv.ParseUint(f[0], 10, 64)
				return kb << 10
			}
		}
	}
	return 0
}

// peakRSS samples the server's RSS every 50 ms until stop is closed and
// returns the highest value seen.
func (s *server) peakRSS(stop <-chan struct{}) <-chan uint64 {
	out := make(chan uint64, 1)
	go func() {
		var peak uint64
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			peak = max(peak, s.rss())
			select {
			case <-stop:
				out <- max(peak, s.rss())
				return
			case <-t.C:
			}
		}
	}()
	return out
}

// metric sums the samples of family name (every label set) on /metrics.
func (s *server) metric(name string) (float64, error) {
	resp, err := http.Get("http://" + s.http + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	return sumFamily(resp.Body, name), nil
}

func sumFamily(r io.Reader, name string) float64 {
	var sum float64
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name) {
			continue
		}
		rest := line[len(name):]
		if rest == "" || (rest[0] != ' ' && rest[0] != '{') {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err == nil {
			sum += v
		}
	}
	return sum
}

func (s *server) classify(ctx context.Context, model string, img []byte, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c := s.clients[s.next.Add(1)%uint64(len(s.clients))]
	_, err := c.Classify(ctx, &visionv1.ClassifyRequest{Model: model, Images: []*visionv1.Image{{Source: &visionv1.Image_Encoded{Encoded: img}}}})
	return err
}

// closedLoop runs n clients back to back for d and returns requests/s and
// the latencies of successes.
func closedLoop(ctx context.Context, s *server, model string, img []byte, n int, d time.Duration) (float64, []time.Duration) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var mu sync.Mutex
	var lat []time.Duration
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			for ctx.Err() == nil {
				t := time.Now()
				if err := s.classify(ctx, model, img, 30*time.Second); err == nil {
					mu.Lock()
					lat = append(lat, time.Since(t))
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	return float64(len(lat)) / d.Seconds(), lat
}

func pct(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	d = slices.Clone(d)
	slices.Sort(d)
	return d[min(len(d)-1, int(p*float64(len(d))))]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000) }
func mib(b uint64) string       { return fmt.Sprintf("%d MiB", b>>20) }
func mibDelta(a, b uint64) string {
	return fmt.Sprintf("%+d MiB", (int64(a)-int64(b))>>20)
}

func overload(ctx context.Context, o options, repo string, img []byte, out io.Writer) error {
	s, err := startServer(ctx, o, repo)
	if err != nil {
		return err
	}
	defer s.stop()
	budget := mib(uint64(config.Default().DecodeMemoryBudget)) // the server runs with the default
	closedLoop(ctx, s, o.model, img, 4, 3*time.Second)         // warm the path
	idle := s.rss()
	_, quiet := closedLoop(ctx, s, o.model, img, 1, 5*time.Second)
	var peak float64
	var peakConc int
	for _, c := range []int{2, 4, 8, 16} {
		rps, _ := closedLoop(ctx, s, o.model, img, c, 8*time.Second)
		if rps > peak {
			peak, peakConc = rps, c
		}
	}
	rate := o.flood * peak
	clientCPU0, serverCPU0 := selfCPU(), s.cpu()
	stopRSS := make(chan struct{})
	rssPeak := s.peakRSS(stopRSS)
	var ok, refused, other atomic.Int64
	var mu sync.Mutex
	var refusedLat []time.Duration
	floodCtx, cancel := context.WithTimeout(ctx, o.duration)
	var wg sync.WaitGroup
	interval := time.Duration(float64(time.Second) / rate)
	next := time.Now()
	var outstanding atomic.Int64
	for floodCtx.Err() == nil {
		next = next.Add(interval)
		time.Sleep(time.Until(next))
		if outstanding.Load() > 4096 {
			other.Add(1) // not sent: the client's own cap
			continue
		}
		outstanding.Add(1)
		wg.Go(func() {
			defer outstanding.Add(-1)
			t := time.Now()
			err := s.classify(ctx, o.model, img, 10*time.Second)
			switch status.Code(err) {
			case codes.OK:
				if time.Since(t) <= 10*time.Second {
					ok.Add(1)
				}
			case codes.ResourceExhausted:
				refused.Add(1)
				mu.Lock()
				refusedLat = append(refusedLat, time.Since(t))
				mu.Unlock()
			default:
				other.Add(1)
			}
		})
	}
	cancel()
	floodEnd := time.Now()
	clientCPU, serverCPU := selfCPU()-clientCPU0, s.cpu()-serverCPU0
	// The first second after the flood: sequential calls as the quiet p50
	// was measured; the flood's stragglers still finish meanwhile.
	var after []time.Duration
	for time.Since(floodEnd) < time.Second {
		t := time.Now()
		if err := s.classify(ctx, o.model, img, 10*time.Second); err == nil {
			after = append(after, time.Since(t))
		}
	}
	wg.Wait()
	close(stopRSS)
	rp := <-rssPeak
	goodput := float64(ok.Load()) / o.duration.Seconds()
	fmt.Fprintf(out, "## Overload\n\nClosed-loop peak %.1f images/s (at %d clients); quiet p50 (1 client) %s. Flood: open loop at %.0f×peak = %.1f requests/s for %v, 10 s client deadlines, dog.jpg.\n\n", peak, peakConc, ms(pct(quiet, 0.5)), o.flood, rate, o.duration)
	fmt.Fprintf(out, "| figure | value | goal |\n|---|---|---|\n")
	fmt.Fprintf(out, "| goodput (OK within deadline) | %.1f images/s = %.0f%% of peak | ≥ 90%% |\n", goodput, 100*goodput/peak)
	fmt.Fprintf(out, "| ResourceExhausted answers | %d, p50 %s, p99 %s | p99 ≤ 10 ms |\n", refused.Load(), ms(pct(refusedLat, 0.5)), ms(pct(refusedLat, 0.99)))
	fmt.Fprintf(out, "| other outcomes (deadline, not sent) | %d | |\n", other.Load())
	fmt.Fprintf(out, "| RSS idle → peak | %s → %s (%s); decode budget %s | ≤ idle + budget + 256 MiB |\n", mib(idle), mib(rp), mibDelta(rp, idle), budget)
	fmt.Fprintf(out, "| p50 in the second after the flood | %s over %d calls (quiet %s) | back to quiet within 1 s |\n", ms(pct(after, 0.5)), len(after), ms(pct(quiet, 0.5)))
	fmt.Fprintf(out, "| CPU during the flood (of %d cores × %v) | server %.1f s, this load generator %.1f s | |\n\n", runtime.NumCPU(), o.duration, serverCPU.Seconds(), clientCPU.Seconds())
	return nil
}

// gzipSize is the size of b gzip-compressed.
func gzipSize(b []byte) int {
	var buf bytes.Buffer
	w := gz.NewWriter(&buf)
	_, _ = w.Write(b)
	_ = w.Close()
	return buf.Len()
}

func slowConsumer(ctx context.Context, o options, repo string, img []byte, out io.Writer) error {
	s, err := startServer(ctx, o, repo)
	if err != nil {
		return err
	}
	defer s.stop()
	tiny := []byte("\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x00\x00\x00\x00:~\x9bU\x00\x00\x00\nIDATx\x9cc\xf8\x0f\x00\x01\x01\x01\x00\x18\xdd\x8d\xb0\x00\x00\x00\x00IEND\xaeB`\x82")
	before := s.rss()
	stopRSS := make(chan struct{})
	rssPeak := s.peakRSS(stopRSS)
	sctx, cancel := context.WithTimeout(ctx, o.slowFor)
	defer cancel()
	var sent atomic.Int64
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			st, err := s.client.StreamClassify(sctx)
			if err != nil {
				return
			}
			for id := uint64(0); sctx.Err() == nil; id++ {
				f := &visionv1.StreamRequest{FrameId: id, Image: &visionv1.Image{Source: &visionv1.Image_Encoded{Encoded: tiny}}}
				if id == 0 {
					f.Model = o.model
				}
				if st.Send(f) != nil {
					return
				}
				sent.Add(1)
			}
		})
	}
	var unaryOK, unaryAll int
	var unaryLat []time.Duration
	for sctx.Err() == nil {
		t := time.Now()
		unaryAll++
		if err := s.classify(ctx, o.model, img, 5*time.Second); err == nil {
			unaryOK++
			unaryLat = append(unaryLat, time.Since(t))
		}
		time.Sleep(250 * time.Millisecond)
	}
	wg.Wait()
	close(stopRSS)
	rp := <-rssPeak
	fmt.Fprintf(out, "## Slow consumer\n\nFour streams sending a 1×1 PNG (%d bytes) as fast as they can, never reading, for %v: %d frames sent.\n\n", len(tiny), o.slowFor, sent.Load())
	fmt.Fprintf(out, "| figure | value | goal |\n|---|---|---|\n")
	fmt.Fprintf(out, "| RSS before → peak | %s → %s (%s) | growth ≤ 100 MiB |\n", mib(before), mib(rp), mibDelta(rp, before))
	fmt.Fprintf(out, "| unary calls meanwhile | %d of %d OK, p50 %s | the server keeps answering |\n\n", unaryOK, unaryAll, ms(pct(unaryLat, 0.5)))
	return nil
}

func unauthFlood(ctx context.Context, o options, repo string, out io.Writer) error {
	const limit = 16 << 20
	s, err := startServer(ctx, o, repo, "--auth-token", "hostile-secret", "--max-message-bytes", strconv.Itoa(limit))
	if err != nil {
		return err
	}
	defer s.stop()
	body := make([]byte, limit-1024) // just under the limit; zeros compress to ~16 KB
	before := s.rss()
	stopRSS := make(chan struct{})
	rssPeak := s.peakRSS(stopRSS)
	fctx, cancel := context.WithTimeout(ctx, o.duration)
	defer cancel()
	// Until the deadline, not until fctx.Err(): gRPC refuses a call at
	// once when the deadline passed, before the context's timer fires.
	end, _ := fctx.Deadline()
	live := func() bool { return time.Now().Before(end) }
	var calls, unauth, other atomic.Int64
	var codesMu sync.Mutex
	otherCodes := map[string]int{}
	var wg sync.WaitGroup
	for i := range 64 {
		wg.Go(func() {
			var opts []grpc.CallOption
			if i%2 == 1 {
				opts = append(opts, grpc.UseCompressor(gzip.Name)) // a gzip bomb
			}
			for live() {
				_, err := s.client.Classify(fctx, &visionv1.ClassifyRequest{Model: o.model, Images: []*visionv1.Image{{Source: &visionv1.Image_Encoded{Encoded: body}}}}, opts...)
				if !live() {
					break // cut off by the end of the flood
				}
				calls.Add(1)
				if status.Code(err) == codes.Unauthenticated {
					unauth.Add(1)
				} else if live() {
					other.Add(1)
					codesMu.Lock()
					otherCodes[fmt.Sprintf("%s: %s", status.Code(err), clipMsg(status.Convert(err).Message()))]++
					codesMu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	close(stopRSS)
	rp := <-rssPeak
	fmt.Fprintf(out, "## Unauthenticated flood\n\nServer with `--auth-token` and `--max-message-bytes %d`. 64 callers without the token for %v: 32 send %d-byte bodies, 32 send them gzip-compressed (a bomb: %d bytes on the wire expand to the limit).\n\n", limit, o.duration, len(body), gzipSize(body))
	fmt.Fprintf(out, "| figure | value | goal |\n|---|---|---|\n")
	fmt.Fprintf(out, "| calls | %d, %d Unauthenticated, %d other %v | all refused |\n", calls.Load(), unauth.Load(), other.Load(), otherCodes)
	fmt.Fprintf(out, "| RSS before → peak | %s → %s (%s) | growth ≤ 100 MiB |\n\n", mib(before), mib(rp), mibDelta(rp, before))
	return nil
}

func churn(ctx context.Context, o options, repo string, out io.Writer) error {
	s, err := startServer(ctx, o, repo)
	if err != nil {
		return err
	}
	defer s.stop()
	tiny := []byte("\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x00\x00\x00\x00:~\x9bU\x00\x00\x00\nIDATx\x9cc\xf8\x0f\x00\x01\x01\x01\x00\x18\xdd\x8d\xb0\x00\x00\x00\x00IEND\xaeB`\x82")
	baseG, err := s.metric("go_goroutines")
	if err != nil {
		return err
	}
	start := time.Now()
	sem := make(chan struct{}, 32)
	var wg sync.WaitGroup
	for i := range o.churn {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			sctx, cancel := context.WithCancel(ctx)
			defer cancel()
			st, err := s.client.StreamClassify(sctx)
			if err != nil {
				return
			}
			for id := range uint64(i%4 + 1) {
				f := &visionv1.StreamRequest{FrameId: id, Image: &visionv1.Image{Source: &visionv1.Image_Encoded{Encoded: tiny}}}
				f.Model = o.model
				_ = st.Send(f)
			}
			if i%3 == 0 {
				_, _ = st.Recv()
			}
			// cancel: the client vanishes with frames in flight
		})
	}
	wg.Wait()
	took := time.Since(start)
	var inflight, goroutines float64
	deadline := time.Now().Add(30 * time.Second)
	for {
		inflight, _ = s.metric("visionserve_inflight_requests")
		goroutines, _ = s.metric("go_goroutines")
		if (inflight == 0 && goroutines <= baseG+5) || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	fmt.Fprintf(out, "## Stream churn\n\n%d streams opened, sent 1–4 frames and vanished (a third after one answer), 32 at a time, in %v.\n\n", o.churn, took.Round(time.Millisecond))
	fmt.Fprintf(out, "| figure | value | goal |\n|---|---|---|\n")
	fmt.Fprintf(out, "| `visionserve_inflight_requests` after | %g | 0 |\n", inflight)
	fmt.Fprintf(out, "| goroutines before → after | %g → %g | back to the baseline |\n\n", baseG, goroutines)
	return nil
}

func clipMsg(s string) string {
	if len(s) > 80 {
		return s[:80]
	}
	return s
}
