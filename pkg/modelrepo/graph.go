package modelrepo

// fillFromGraph reads the input and output of the ONNX graph at path and
// fills what the config left out; it fails where the config contradicts
// the graph.
func fillFromGraph(cfg *Config, path string) error {
	// TODO(integration): read the graph through internal/onnx.
	return nil
}
