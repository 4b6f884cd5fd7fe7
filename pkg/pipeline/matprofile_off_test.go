//go:build !matprofile

package pipeline

// Without the matprofile tag gocv keeps no count; run the tests with
// -tags matprofile to check that every Mat is closed.
const matProfiling = false

func matCount() int { return 0 }

func matProfile() string { return "" }
