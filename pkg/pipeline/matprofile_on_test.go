//go:build matprofile

package pipeline

import (
	"bytes"

	"gocv.io/x/gocv"
)

const matProfiling = true

func matCount() int { return gocv.MatProfile.Count() }

func matProfile() string {
	var b bytes.Buffer
	_ = gocv.MatProfile.WriteTo(&b, 1)
	return b.String()
}
