package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/visionserve/visionserve/internal/machine"
	"github.com/visionserve/visionserve/internal/testimage"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// testImage is an encoded image and where it came from.
type testImage struct {
	data []byte
	from string
}

// images holds the image sent to each task.
type images struct{ detect, classify testImage }

// loadImages reads the flags' images, else the shared test photos, else
// makes synthetic ones.
func loadImages(o options) (images, error) {
	shared := filepath.Join(machine.Command(context.Background(), "git", "rev-parse", "--show-toplevel"), "..", "shared", "testdata", "images")
	pick := func(flagPath, sharedName string, w, h int) (testImage, error) {
		if flagPath != "" {
			b, err := os.ReadFile(flagPath)
			if err != nil {
				return testImage{}, err
			}
			return testImage{b, flagPath}, nil
		}
		if b, err := os.ReadFile(filepath.Join(shared, sharedName)); err == nil {
			return testImage{b, "shared testdata " + sharedName}, nil
		}
		return testImage{testimage.JPEG(w, h), fmt.Sprintf("synthetic %dx%d JPEG", w, h)}, nil
	}
	var imgs images
	var err error
	if imgs.detect, err = pick(o.imageDetect, "bus.jpg", 810, 1080); err != nil {
		return imgs, err
	}
	imgs.classify, err = pick(o.imageClassify, "dog.jpg", 640, 480)
	return imgs, err
}

// sweepServer sweeps the models of the server at addr.
func sweepServer(ctx context.Context, o options, addr string, imgs images, dir string, progress io.Writer) ([]ModelSweep, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	c := visionv1.NewVisionServiceClient(conn)
	models, err := readyModels(ctx, c, o.models, o.readyTimeout)
	if err != nil {
		return nil, err
	}
	var sweeps []ModelSweep
	for _, m := range models {
		img := imgs.classify
		if m.GetTask() == visionv1.Task_TASK_DETECT {
			img = imgs.detect
		}
		call := caller(c, m, img.data, o.timeout)
		s := ModelSweep{Model: m.GetName(), Backend: m.GetBackend(), Task: strings.ToLower(strings.TrimPrefix(m.GetTask().String(), "TASK_")), Addr: addr, Image: img.from}
		fmt.Fprintf(progress, "%s on %s (%s)\n", s.Model, s.Backend, addr)
		if o.warmup > 0 {
			closedLoop(ctx, 1, o.warmup, call, io.Discard)
		}
		for _, n := range o.concurrency {
			fmt.Fprintf(progress, "  closed loop, %d clients, %v\n", n, o.step)
			s.Points = append(s.Points, closedLoop(ctx, n, o.step, call, progress))
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
		}
		rates := o.rates
		if len(rates) == 0 {
			top := peak(s.Points)
			for _, f := range o.rateFractions {
				rates = append(rates, roundRate(f*top))
			}
		}
		for _, r := range rates {
			fmt.Fprintf(progress, "  open loop, %v requests/s, %v\n", r, o.step)
			s.Points = append(s.Points, openLoop(ctx, r, o.step, o.maxInFlight, call))
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
		}
		s.Plot = sanitize(s.Model+"-"+s.Backend) + ".png"
		if err := writePlot(s, filepath.Join(dir, s.Plot)); err != nil {
			return nil, fmt.Errorf("plotting %s: %w", s.Model, err)
		}
		sweeps = append(sweeps, s)
	}
	return sweeps, nil
}

// roundRate keeps two significant figures, so that rates read well.
func roundRate(r float64) float64 {
	if r <= 0 {
		return 0.1
	}
	scale := 1.0
	for r*scale < 10 {
		scale *= 10
	}
	for r*scale >= 100 {
		scale /= 10
	}
	return float64(int(r*scale+0.5)) / scale
}

// readyModels waits until every wanted model of the server is ready and
// returns their descriptions; an unknown wanted model is an error.
func readyModels(ctx context.Context, c visionv1.VisionServiceClient, want []string, timeout time.Duration) ([]*visionv1.ModelInfoResponse, error) {
	deadline := time.Now().Add(timeout)
	for {
		lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		resp, err := c.ListModels(lctx, &visionv1.ListModelsRequest{})
		cancel()
		var models []*visionv1.ModelInfoResponse
		ready := err == nil
		if err == nil {
			for _, m := range resp.GetModels() {
				if len(want) > 0 && !slices.Contains(want, m.GetName()) {
					continue
				}
				models = append(models, m)
				ready = ready && m.GetReady()
			}
			for _, w := range want {
				if !slices.ContainsFunc(models, func(m *visionv1.ModelInfoResponse) bool { return m.GetName() == w }) {
					return nil, fmt.Errorf("model %q not served (it has %d models)", w, len(resp.GetModels()))
				}
			}
			if len(models) == 0 {
				return nil, fmt.Errorf("no models served")
			}
		}
		if ready {
			return models, nil
		}
		if time.Now().After(deadline) {
			if err != nil {
				return nil, fmt.Errorf("not answering after %v: %w", timeout, err)
			}
			return nil, fmt.Errorf("models not ready after %v", timeout)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// caller sends one image per request to model m.
func caller(c visionv1.VisionServiceClient, m *visionv1.ModelInfoResponse, img []byte, timeout time.Duration) func(context.Context) error {
	images := []*visionv1.Image{{Source: &visionv1.Image_Encoded{Encoded: img}}}
	name := m.GetName()
	detect := m.GetTask() == visionv1.Task_TASK_DETECT
	return func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		var n int
		if detect {
			r, err := c.Detect(ctx, &visionv1.DetectRequest{Model: name, Images: images})
			if err != nil {
				return err
			}
			n = len(r.GetResults())
		} else {
			r, err := c.Classify(ctx, &visionv1.ClassifyRequest{Model: name, Images: images})
			if err != nil {
				return err
			}
			n = len(r.GetResults())
		}
		if n != 1 {
			return fmt.Errorf("%d results for 1 image", n)
		}
		return nil
	}
}
