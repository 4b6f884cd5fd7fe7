package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"gocv.io/x/gocv"
	"google.golang.org/protobuf/types/known/timestamppb"

	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// frameStream is the client side of StreamClassify and StreamDetect.
type frameStream interface {
	Send(*visionv1.StreamRequest) error
	Recv() (*visionv1.StreamResponse, error)
	CloseSend() error
}

// runVideo sends the frames of a video file over a stream and prints each
// answer, dropped frames included. A sender goroutine reads, encodes and
// sends frames (at --fps when set); this goroutine receives, and waits for
// the sender before returning.
func runVideo(ctx context.Context, c visionv1.VisionServiceClient, task string, o Options, path string, p *printer) error {
	vc, err := gocv.VideoCaptureFile(path)
	if err != nil {
		return fmt.Errorf("opening video %s: %w", path, err)
	}
	defer vc.Close()
	if !vc.IsOpened() {
		return fmt.Errorf("opening video %s: not a readable video", path)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var st frameStream
	if task == "classify" {
		st, err = c.StreamClassify(ctx)
	} else {
		st, err = c.StreamDetect(ctx)
	}
	if err != nil {
		return err
	}
	sent := make(chan error, 1)
	go func() { sent <- sendFrames(ctx, vc, st, o) }()

	var served, dropped int
	var recvErr error
	for {
		r, err := st.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			recvErr = err
			cancel()
			break
		}
		served++
		dropped += int(r.GetDroppedFrames())
		p.frame(path, o.Model, task, r)
	}
	sendErr := <-sent
	p.flush()
	if recvErr != nil {
		return fmt.Errorf("video %s: %w", path, recvErr)
	}
	if sendErr != nil {
		return fmt.Errorf("video %s: %w", path, sendErr)
	}
	if !o.JSON {
		fmt.Fprintf(p.tw, "%s: %d frames served, %d dropped\n", path, served, dropped)
	}
	return nil
}

// sendFrames reads every frame, encodes it as JPEG and sends it, then
// closes the sending side.
func sendFrames(ctx context.Context, vc *gocv.VideoCapture, st frameStream, o Options) error {
	defer st.CloseSend()
	frame := gocv.NewMat()
	defer frame.Close()
	var tick *time.Ticker
	if o.FPS > 0 {
		tick = time.NewTicker(time.Duration(float64(time.Second) / o.FPS))
		defer tick.Stop()
	}
	for id := uint64(1); ; id++ {
		if !vc.Read(&frame) || frame.Empty() {
			return nil
		}
		buf, err := gocv.IMEncode(gocv.JPEGFileExt, frame)
		if err != nil {
			return fmt.Errorf("encoding frame %d: %w", id, err)
		}
		data := append([]byte(nil), buf.GetBytes()...)
		buf.Close()
		req := &visionv1.StreamRequest{FrameId: id, Timestamp: timestamppb.Now(), Image: &visionv1.Image{Source: &visionv1.Image_Encoded{Encoded: data}}}
		if id == 1 {
			req.Model, req.Options = o.Model, o.options()
		}
		if err := st.Send(req); err != nil {
			// The receiver sees the stream's status.
			return nil
		}
		if tick != nil {
			select {
			case <-tick.C:
			case <-ctx.Done():
				return nil
			}
		}
	}
}
