package client

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/visionserve/visionserve/internal/visionjson"
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

// The JSON shapes of results live in visionjson, shared with the REST API.
type (
	JSONResult    = visionjson.Result
	JSONClass     = visionjson.Class
	JSONDetection = visionjson.Detection
	JSONBox       = visionjson.Box
)

// ToJSON is visionjson.FromResult.
var ToJSON = visionjson.FromResult

func (p *printer) header() {
	if !p.started && !p.json {
		fmt.Fprintln(p.tw, "IMAGE\tMODEL\tBACKEND\tSIZE\tRESULT\tSCORE\tBOX")
	}
	p.started = true
}

// result prints one image's result.
func (p *printer) result(image, model, task string, r *visionv1.ImageResult) {
	if p.json {
		_ = p.enc.Encode(ToJSON(image, model, task, r))
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
			j = ToJSON(video, model, task, r.GetResult())
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
