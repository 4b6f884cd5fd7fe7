package server

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"unicode/utf8"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/visionserve/visionserve/pkg/batcher"
	"github.com/visionserve/visionserve/pkg/engine/failover"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

// toStatus maps an error of a Runner (or of the request checks) to the
// gRPC status the client gets. Every case is chosen on purpose; a status
// coming from further down is never passed through, because its code
// described that call, not this one.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	var se *statusError
	switch {
	case errors.As(err, &se):
		return status.Error(se.code, se.msg)
	case pipeline.IsInputError(err), errors.Is(err, batcher.ErrRequestTooLarge):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, pipeline.ErrDecodeBudget):
		return status.Error(codes.ResourceExhausted, err.Error()+" (--decode-memory-budget)")
	case errors.Is(err, batcher.ErrQueueFull):
		return status.Error(codes.ResourceExhausted, err.Error()+"; retry later")
	case errors.Is(err, batcher.ErrBatcherClosed):
		return status.Error(codes.Unavailable, err.Error())
	case errors.Is(err, failover.ErrBackendUnavailable):
		// The GPU failed this batch; later ones run on the CPU fallback.
		return status.Error(codes.Unavailable, err.Error()+"; retry")
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, "deadline exceeded before the request was served")
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, "request canceled")
	}
	return status.Error(codes.Internal, "inference failed: "+err.Error())
}

// statusError is an error of the request checks in this package that
// already knows its code.
type statusError struct {
	code codes.Code
	msg  string
}

func (e *statusError) Error() string { return e.msg }

func invalid(format string, args ...any) error {
	return &statusError{codes.InvalidArgument, fmt.Sprintf(format, args...)}
}

func notFound(format string, args ...any) error {
	return &statusError{codes.NotFound, fmt.Sprintf(format, args...)}
}

func unavailable(format string, args ...any) error {
	return &statusError{codes.Unavailable, fmt.Sprintf(format, args...)}
}

// maxEchoed bounds a client's string echoed in an error or a log line:
// a name is short, and a 16 MiB one must not travel back or fill logs.
const maxEchoed = 64

// clip bounds a client's string for echoing: at most maxEchoed bytes,
// cut at a rune boundary, with how long it really was. Quote the result
// (%q) so that control characters cannot forge log lines.
func clip(s string) string {
	if len(s) <= maxEchoed {
		return s
	}
	cut := maxEchoed
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…(" + strconv.Itoa(len(s)) + " bytes)"
}

// clipShape bounds a client's shape for echoing.
func clipShape(shape []int64) []int64 {
	if len(shape) <= 8 {
		return shape
	}
	return shape[:8]
}
