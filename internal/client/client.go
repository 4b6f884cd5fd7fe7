// Package client is the logic of the infer-client command: it classifies
// or detects images and video over the visionserve gRPC API, prints tables
// or JSON lines, draws boxes, and measures throughput and latency under
// load.
package client

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/visionserve/visionserve/proto/inference"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// Options are the flags common to every subcommand.
type Options struct {
	Addr    string
	Model   string
	JSON    bool
	Timeout time.Duration
	// Batch is the most images sent in one request.
	Batch int
	// Request options; zero means the model's default.
	TopK          int
	Confidence    float64
	IoU           float64
	MaxDetections int
	// Draw is where images with boxes are written (a folder, or a file
	// for a single image).
	Draw string
	// Video forces the inputs to be read as video.
	Video bool
	// FPS paces video frames; 0 sends them as fast as they are read.
	FPS float64
	// TLS settings: TLS turns it on; CA verifies the server; Cert and
	// Key present a client certificate (mTLS).
	TLS        bool
	CA         string
	Cert, Key  string
	ServerName string
	// Token is sent as "authorization: Bearer <token>".
	Token string
	// Load mode.
	Concurrency int
	Duration    time.Duration
	Requests    int
	// Tensor makes load send zero FP32 tensors through ModelInfer.
	Tensor bool
}

const usage = `usage: infer-client COMMAND [flags] FILE|DIR...

commands:
  classify   classify images (or a video over a stream)
  detect     detect objects in images (or a video over a stream)
  load       send one image repeatedly: --concurrency N with --duration D or --requests N
  models     list the server's models

flags:
`

// Main runs the client with args (without the program name) and returns
// the process exit code.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stderr, usage)
		newFlags(&Options{}, stderr).PrintDefaults()
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	cmd := args[0]
	var o Options
	fs := newFlags(&o, stderr)
	if tok := getenv("VISIONSERVE_AUTH_TOKEN"); tok != "" {
		o.Token = tok
	}
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if err := run(ctx, cmd, o, fs.Args(), stdout, stderr); err != nil {
		fmt.Fprintf(stderr, "infer-client: %v\n", err)
		return 1
	}
	return 0
}

func newFlags(o *Options, out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("infer-client", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&o.Addr, "addr", "localhost:8001", "server address HOST:PORT")
	fs.StringVar(&o.Model, "model", "", "model name (see `infer-client models`)")
	fs.BoolVar(&o.JSON, "json", false, "print one JSON object per image")
	fs.DurationVar(&o.Timeout, "timeout", 60*time.Second, "deadline of each request")
	fs.IntVar(&o.Batch, "batch", 8, "most images per request")
	fs.IntVar(&o.TopK, "top-k", 0, "classes per image (0: model default)")
	fs.Float64Var(&o.Confidence, "confidence", 0, "minimum detection score (0: model default)")
	fs.Float64Var(&o.IoU, "iou", 0, "NMS IoU threshold (0: model default)")
	fs.IntVar(&o.MaxDetections, "max-detections", 0, "most detections per image (0: model default)")
	fs.StringVar(&o.Draw, "draw", "", "write images with boxes here (folder, or file for one image)")
	fs.BoolVar(&o.Video, "video", false, "read the inputs as video files")
	fs.Float64Var(&o.FPS, "fps", 0, "send video frames at this rate (0: as fast as read)")
	fs.BoolVar(&o.TLS, "tls", false, "use TLS")
	fs.StringVar(&o.CA, "tls-ca", "", "CA bundle that verifies the server (PEM); implies --tls")
	fs.StringVar(&o.Cert, "tls-cert", "", "client certificate for mTLS (PEM); implies --tls")
	fs.StringVar(&o.Key, "tls-key", "", "client key for mTLS (PEM)")
	fs.StringVar(&o.ServerName, "tls-server-name", "", "server name to verify (default: the host of --addr)")
	fs.StringVar(&o.Token, "token", o.Token, "bearer token (env VISIONSERVE_AUTH_TOKEN)")
	fs.IntVar(&o.Concurrency, "concurrency", 4, "load: concurrent clients")
	fs.DurationVar(&o.Duration, "duration", 0, "load: how long to run")
	fs.IntVar(&o.Requests, "requests", 0, "load: how many requests in all")
	fs.BoolVar(&o.Tensor, "tensor", false, "load: send a zero FP32 input tensor through the Open Inference Protocol's ModelInfer (as perf_analyzer does) instead of an image")
	return fs
}

func run(ctx context.Context, cmd string, o Options, args []string, stdout, stderr io.Writer) error {
	switch cmd {
	case "classify", "detect", "load", "models":
	default:
		return fmt.Errorf("unknown command %q (want classify, detect, load or models)", cmd)
	}
	conn, err := Dial(o)
	if err != nil {
		return err
	}
	defer conn.Close()
	c := visionv1.NewVisionServiceClient(conn)
	switch cmd {
	case "models":
		return listModels(ctx, c, o, stdout)
	case "load":
		if o.Tensor && o.Model != "" && len(args) == 0 {
			return runTensorLoad(ctx, inference.NewGRPCInferenceServiceClient(conn), o, stderr, stdout)
		}
		if o.Model == "" || len(args) != 1 {
			return errors.New("load needs --model and one image file (or --tensor and no file)")
		}
		return runLoad(ctx, c, o, args[0], stderr, stdout)
	}
	if o.Model == "" {
		return errors.New("--model is required")
	}
	if len(args) == 0 {
		return errors.New("no FILE or DIR given")
	}
	images, videos, err := expand(args, o.Video)
	if err != nil {
		return err
	}
	p := newPrinter(stdout, o.JSON)
	defer p.flush()
	if len(images) > 0 {
		if err := runImages(ctx, c, cmd, o, images, p); err != nil {
			return err
		}
	}
	for _, v := range videos {
		if err := runVideo(ctx, c, cmd, o, v, p); err != nil {
			return err
		}
	}
	return nil
}

// Dial connects to the server with the TLS and token settings of o.
func Dial(o Options) (*grpc.ClientConn, error) {
	creds := insecure.NewCredentials()
	if o.TLS || o.CA != "" || o.Cert != "" {
		tc := &tls.Config{ServerName: o.ServerName, MinVersion: tls.VersionTLS12}
		if o.CA != "" {
			pem, err := os.ReadFile(o.CA)
			if err != nil {
				return nil, fmt.Errorf("reading CA: %w", err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("CA %s holds no PEM certificate", o.CA)
			}
			tc.RootCAs = pool
		}
		if o.Cert != "" {
			cert, err := tls.LoadX509KeyPair(o.Cert, o.Key)
			if err != nil {
				return nil, fmt.Errorf("loading client certificate: %w", err)
			}
			tc.Certificates = []tls.Certificate{cert}
		}
		creds = credentials.NewTLS(tc)
	}
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(64<<20)),
	}
	if o.Token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(token(o.Token)))
	}
	return grpc.NewClient(o.Addr, opts...)
}

// token sends the bearer token with every call.
type token string

func (t token) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(t)}, nil
}

// RequireTransportSecurity is false so that a token also works on a
// plaintext loopback connection; over a network, use --tls.
func (t token) RequireTransportSecurity() bool { return false }

var (
	imageExts = []string{".jpg", ".jpeg", ".png", ".bmp", ".webp"}
	videoExts = []string{".mp4", ".avi", ".mkv", ".mov", ".webm"}
)

// expand turns the FILE|DIR arguments into image and video files; a
// folder contributes its image and video files, sorted.
func expand(args []string, forceVideo bool) (images, videos []string, err error) {
	add := func(path string, explicit bool) {
		ext := strings.ToLower(filepath.Ext(path))
		switch {
		case forceVideo || slices.Contains(videoExts, ext):
			videos = append(videos, path)
		case slices.Contains(imageExts, ext) || explicit:
			images = append(images, path)
		}
	}
	for _, a := range args {
		st, err := os.Stat(a)
		if err != nil {
			return nil, nil, err
		}
		if !st.IsDir() {
			add(a, true)
			continue
		}
		entries, err := os.ReadDir(a)
		if err != nil {
			return nil, nil, err
		}
		for _, e := range entries {
			if !e.IsDir() {
				add(filepath.Join(a, e.Name()), false)
			}
		}
	}
	if len(images) == 0 && len(videos) == 0 {
		return nil, nil, fmt.Errorf("no image or video files in %v", args)
	}
	return images, videos, nil
}

func (o Options) options() *visionv1.Options {
	return &visionv1.Options{TopK: int32(o.TopK), Confidence: float32(o.Confidence), Iou: float32(o.IoU), MaxDetections: int32(o.MaxDetections)}
}

func listModels(ctx context.Context, c visionv1.VisionServiceClient, o Options, stdout io.Writer) error {
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	resp, err := c.ListModels(ctx, &visionv1.ListModelsRequest{})
	if err != nil {
		return err
	}
	p := newPrinter(stdout, o.JSON)
	defer p.flush()
	for _, m := range resp.Models {
		p.model(m)
	}
	return nil
}
