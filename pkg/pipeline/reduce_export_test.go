package pipeline

// Reduction is the reduction Prepare chooses for an upright w×h JPEG,
// for the tests of package pipeline_test.
func (p *Preprocessor) Reduction(w, h int) int { return p.reduction(w, h) }
