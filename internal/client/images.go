package client

import (
	"context"
	"fmt"
	"image"
	"image/color"
	"os"
	"path/filepath"

	"gocv.io/x/gocv"

	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// infer sends one request of images for the task and returns the results.
func infer(ctx context.Context, c visionv1.VisionServiceClient, task string, o Options, imgs []*visionv1.Image) ([]*visionv1.ImageResult, error) {
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	if task == "classify" {
		resp, err := c.Classify(ctx, &visionv1.ClassifyRequest{Model: o.Model, Images: imgs, Options: o.options()})
		return resp.GetResults(), err
	}
	resp, err := c.Detect(ctx, &visionv1.DetectRequest{Model: o.Model, Images: imgs, Options: o.options()})
	return resp.GetResults(), err
}

// runImages sends the files in requests of at most o.Batch images and
// prints each result.
func runImages(ctx context.Context, c visionv1.VisionServiceClient, task string, o Options, files []string, p *printer) error {
	batch := max(o.Batch, 1)
	for start := 0; start < len(files); start += batch {
		chunk := files[start:min(start+batch, len(files))]
		imgs := make([]*visionv1.Image, len(chunk))
		data := make([][]byte, len(chunk))
		for i, f := range chunk {
			b, err := os.ReadFile(f)
			if err != nil {
				return err
			}
			data[i] = b
			imgs[i] = &visionv1.Image{Source: &visionv1.Image_Encoded{Encoded: b}}
		}
		results, err := infer(ctx, c, task, o, imgs)
		if err != nil {
			return fmt.Errorf("%s: %w", chunk[0], err)
		}
		for i, r := range results {
			p.result(chunk[i], o.Model, task, r)
			if o.Draw != "" && task == "detect" {
				if err := draw(data[i], r, drawPath(o.Draw, chunk[i], len(files))); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// drawPath is where the drawn copy of src goes: out itself for a single
// image that is not a folder, else out/<name>.
func drawPath(out, src string, n int) string {
	if st, err := os.Stat(out); n == 1 && (err != nil || !st.IsDir()) && filepath.Ext(out) != "" {
		return out
	}
	return filepath.Join(out, filepath.Base(src))
}

// draw writes the image with its detections boxed and labelled.
func draw(data []byte, r *visionv1.ImageResult, path string) error {
	img, err := gocv.IMDecode(data, gocv.IMReadColor)
	if err != nil {
		return fmt.Errorf("decoding for --draw: %w", err)
	}
	defer img.Close()
	drawDetections(&img, r)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	if !gocv.IMWrite(path, img) {
		return fmt.Errorf("writing %s failed", path)
	}
	return nil
}

func drawDetections(img *gocv.Mat, r *visionv1.ImageResult) {
	green := color.RGBA{G: 220, A: 255}
	thick := max(1, img.Cols()/400)
	for _, d := range r.GetDetections() {
		b := d.GetBox()
		rect := image.Rect(int(b.GetX1()), int(b.GetY1()), int(b.GetX2()), int(b.GetY2()))
		gocv.Rectangle(img, rect, green, thick)
		label := fmt.Sprintf("%s %.2f", d.GetLabel(), d.GetScore())
		gocv.PutText(img, label, image.Pt(rect.Min.X, max(rect.Min.Y-4, 12)), gocv.FontHersheySimplex, 0.5*float64(thick), green, thick)
	}
}
