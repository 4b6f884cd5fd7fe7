// Package pipeline turns encoded images into model inputs and model
// outputs into results: it reads the image header in pure Go, applies the
// JPEG EXIF orientation, decodes with gocv (at a reduced size for large
// JPEGs when the model input allows), preprocesses straight into a batch
// slot (engine.Batch), and postprocesses output rows into classes (top-k)
// or boxes (YOLOv8 decode and NMS, mapped back to original pixels).
// Batching is package batcher's; running is the engines'.
//
// Input limits: encoded images must be JPEG (baseline, progressive, grey,
// CMYK), PNG (1-16 bit, grey, palette, alpha), WebP (lossy, lossless,
// extended; not animated) or BMP; their header is read in pure Go first and
// images over PreprocessOptions.MaxPixels (DefaultMaxPixels, 40 MP) or with
// a zero side are refused before any pixel is allocated. JPEG EXIF
// orientation is applied; alpha is dropped; 16-bit samples are scaled to
// 8 bits. Every refusal is one of the typed errors in errors.go.
package pipeline
