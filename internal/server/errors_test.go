package server

import (
	"context"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/visionserve/visionserve/pkg/batcher"
	"github.com/visionserve/visionserve/pkg/engine/failover"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

func TestToStatus(t *testing.T) {
	wrap := func(err error) error { return fmt.Errorf("model m: %w", err) }
	tests := []struct {
		err  error
		want codes.Code
	}{
		{wrap(pipeline.ErrCorrupt), codes.InvalidArgument},
		{wrap(batcher.ErrRequestTooLarge), codes.InvalidArgument},
		{wrap(batcher.ErrQueueFull), codes.ResourceExhausted},
		{wrap(pipeline.ErrDecodeBudget), codes.ResourceExhausted},
		{wrap(batcher.ErrBatcherClosed), codes.Unavailable},
		{wrap(failover.ErrBackendUnavailable), codes.Unavailable},
		{wrap(context.DeadlineExceeded), codes.DeadlineExceeded},
		{wrap(context.Canceled), codes.Canceled},
		{notFound("model %q", "x"), codes.NotFound},
		// A status from further down is not passed through.
		{wrap(status.Error(codes.NotFound, "engine said so")), codes.Internal},
	}
	for _, tt := range tests {
		if got := status.Code(toStatus(tt.err)); got != tt.want {
			t.Errorf("toStatus(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}
