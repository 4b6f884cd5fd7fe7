package pipeline

import "time"

// Options are the per-request settings; a zero field takes the model's
// default from its config.
type Options struct {
	TopK          int     // classifiers: classes to return
	Confidence    float32 // detectors: minimum score
	IoU           float32 // detectors: NMS overlap threshold
	MaxDetections int     // detectors: most boxes per image
}

// Class is one scored class of a classifier.
type Class struct {
	Index int
	Label string
	Score float32 // softmax probability
}

// Box is an axis-aligned box in original-image pixels.
type Box struct {
	X1, Y1, X2, Y2 float32
}

// Detection is one detected object.
type Detection struct {
	Index int
	Label string
	Score float32
	Box   Box
}

// StageTimings says where a request's time went.
type StageTimings struct {
	Decode      time.Duration // bytes to pixels
	Preprocess  time.Duration // resize and normalise into the batch slot
	Queue       time.Duration // waiting for a batch
	Inference   time.Duration // the engine run of the batch it was in
	Postprocess time.Duration // outputs to classes or boxes
}

// Result is what one image gives.
type Result struct {
	// Width and Height of the original image, after EXIF orientation.
	Width, Height int
	Classes       []Class     // classifiers
	Detections    []Detection // detectors
	Timings       StageTimings
	// Backend names the engine that ran the batch.
	Backend string
	// BatchSize is the number of images in the engine run.
	BatchSize int
}
