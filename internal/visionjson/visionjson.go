// Package visionjson is the JSON form of the vision API's results: what
// infer-client --json prints and the REST vision API answers.
package visionjson

import visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"

// Class, Box and Detection are the JSON shapes of results.
type Class struct {
	Label string  `json:"label"`
	Index int32   `json:"index"`
	Score float32 `json:"score"`
}

// Box is a box in original-image pixels.
type Box struct {
	X1 float32 `json:"x1"`
	Y1 float32 `json:"y1"`
	X2 float32 `json:"x2"`
	Y2 float32 `json:"y2"`
}

// Detection is one detected object.
type Detection struct {
	Label string  `json:"label"`
	Index int32   `json:"index"`
	Score float32 `json:"score"`
	Box   Box     `json:"box"`
}

// Result is one image's result: a line of infer-client --json output.
type Result struct {
	Image      string      `json:"image"`
	Frame      *uint64     `json:"frame,omitempty"`
	Model      string      `json:"model"`
	Backend    string      `json:"backend,omitempty"`
	Classes    []Class     `json:"classes,omitempty"`
	Detections []Detection `json:"detections,omitempty"`
	// DroppedFrames counts the frames before this one that a newer
	// frame replaced before they were served (video only).
	DroppedFrames uint64 `json:"dropped_frames,omitempty"`
	Error         string `json:"error,omitempty"`
}

// FromResult is the JSON of one image's result: a line of infer-client
// --json, and the REST vision API's answer.
func FromResult(image, model, task string, r *visionv1.ImageResult) Result {
	out := Result{Image: image, Model: model, Backend: r.GetBackend()}
	if task == "classify" {
		out.Classes = []Class{}
		for _, c := range r.GetClasses() {
			out.Classes = append(out.Classes, Class{c.Label, c.Index, c.Score})
		}
	} else {
		out.Detections = []Detection{}
		for _, d := range r.GetDetections() {
			b := d.GetBox()
			out.Detections = append(out.Detections, Detection{d.Label, d.Index, d.Score, Box{b.GetX1(), b.GetY1(), b.GetX2(), b.GetY2()}})
		}
	}
	return out
}
