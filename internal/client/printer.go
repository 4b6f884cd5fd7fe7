package client

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// printer writes results as a table or as JSON lines.
type printer struct {
	json    bool
	enc     *json.Encoder
	tw      *tabwriter.Writer
	started bool
}

func newPrinter(w io.Writer, asJSON bool) *printer {
	return &printer{json: asJSON, enc: json.NewEncoder(w), tw: tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)}
}

func (p *printer) flush() { p.tw.Flush() }

// JSONClass, JSONBox and JSONDetection are the JSON shapes of results.
type JSONClass struct {
	Label string  `json:"label"`
	Index int32   `json:"index"`
	Score float32 `json:"score"`
}

// JSONBox is a box in original-image pixels.
type JSONBox struct {
	X1 float32 `json:"x1"`
	Y1 float32 `json:"y1"`
	X2 float32 `json:"x2"`
	Y2 float32 `json:"y2"`
}

// JSONDetection is one detected object.
type JSONDetection struct {
	Label string  `json:"label"`
	Index int32   `json:"index"`
	Score float32 `json:"score"`
	Box   JSONBox `json:"box"`
}

// JSONResult is one line of --json output.
type JSONResult struct {
	Image      string          `json:"image"`
	Frame      *uint64         `json:"frame,omitempty"`
	Model      string          `json:"model"`
	Backend    string          `json:"backend,omitempty"`
	Classes    []JSONClass     `json:"classes,omitempty"`
	Detections []JSONDetection `json:"detections,omitempty"`
	// DroppedFrames counts the frames before this one that a newer
	// frame replaced before they were served (video only).
	DroppedFrames uint64 `json:"dropped_frames,omitempty"`
	Error         string `json:"error,omitempty"`
}

func toJSON(image, model, task string, r *visionv1.ImageResult) JSONResult {
	out := JSONResult{Image: image, Model: model, Backend: r.GetBackend()}
	if task == "classify" {
		out.Classes = []JSONClass{}
		for _, c := range r.GetClasses() {
			out.Classes = append(out.Classes, JSONClass{c.Label, c.Index, c.Score})
		}
	} else {
		out.Detections = []JSONDetection{}
		for _, d := range r.GetDetections() {
			b := d.GetBox()
			out.Detections = append(out.Detections, JSONDetection{d.Label, d.Index, d.Score, JSONBox{b.GetX1(), b.GetY1(), b.GetX2(), b.GetY2()}})
		}
	}
	return out
}

func (p *printer) header() {
	if !p.started && !p.json {
		fmt.Fprintln(p.tw, "IMAGE\tMODEL\tBACKEND\tSIZE\tRESULT\tSCORE\tBOX")
	}
	p.started = true
}

// result prints one image's result.
func (p *printer) result(image, model, task string, r *visionv1.ImageResult) {
	if p.json {
		_ = p.enc.Encode(toJSON(image, model, task, r))
		return
	}
	p.header()
	size := fmt.Sprintf("%dx%d", r.GetWidth(), r.GetHeight())
	lead := fmt.Sprintf("%s\t%s\t%s\t%s", image, model, r.GetBackend(), size)
	if task == "classify" {
		for _, c := range r.GetClasses() {
			fmt.Fprintf(p.tw, "%s\t%s (%d)\t%.4f\n", lead, c.Label, c.Index, c.Score)
			lead = "\t\t\t"
		}
		return
	}
	if len(r.GetDetections()) == 0 {
		fmt.Fprintf(p.tw, "%s\t(nothing)\n", lead)
	}
	for _, d := range r.GetDetections() {
		b := d.GetBox()
		fmt.Fprintf(p.tw, "%s\t%s (%d)\t%.4f\t%.1f,%.1f,%.1f,%.1f\n", lead, d.Label, d.Index, d.Score, b.GetX1(), b.GetY1(), b.GetX2(), b.GetY2())
		lead = "\t\t\t"
	}
}

// frame prints one video frame's answer.
func (p *printer) frame(video, model, task string, r *visionv1.StreamResponse) {
	name := fmt.Sprintf("%s#%d", video, r.GetFrameId())
	switch {
	case p.json:
		var j JSONResult
		if r.GetResult() != nil {
			j = toJSON(video, model, task, r.GetResult())
		} else {
			j = JSONResult{Image: video, Model: model}
		}
		id := r.GetFrameId()
		j.Frame, j.DroppedFrames = &id, r.GetDroppedFrames()
		if e := r.GetError(); e != nil {
			j.Error = e.GetMessage()
		}
		_ = p.enc.Encode(j)
	case r.GetError() != nil:
		p.header()
		fmt.Fprintf(p.tw, "%s\t%s\t\t\terror: %s\n", name, model, r.GetError().GetMessage())
	default:
		p.result(name, model, task, r.GetResult())
	}
}

func (p *printer) model(m *visionv1.ModelInfoResponse) {
	if p.json {
		_ = p.enc.Encode(map[string]any{
			"name": m.Name, "task": strings.ToLower(strings.TrimPrefix(m.Task.String(), "TASK_")), "backend": m.Backend,
			"input": fmt.Sprintf("%dx%d", m.InputWidth, m.InputHeight), "labels": m.LabelsCount,
			"max_batch_size": m.GetBatching().GetMaxBatchSize(), "ready": m.Ready,
		})
		return
	}
	if !p.started {
		fmt.Fprintln(p.tw, "MODEL\tTASK\tBACKEND\tINPUT\tLABELS\tMAX BATCH\tINSTANCES\tREADY")
		p.started = true
	}
	fmt.Fprintf(p.tw, "%s\t%s\t%s\t%dx%d\t%d\t%d\t%d\t%v\n", m.Name, strings.ToLower(strings.TrimPrefix(m.Task.String(), "TASK_")), m.Backend,
		m.InputWidth, m.InputHeight, m.LabelsCount, m.GetBatching().GetMaxBatchSize(), m.GetBatching().GetInstances(), m.Ready)
}
