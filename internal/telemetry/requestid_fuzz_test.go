package telemetry

import (
	"context"
	"testing"

	"google.golang.org/grpc/metadata"
)

// FuzzRequestID feeds arbitrary x-request-id values, as a client may send
// them, and checks the id the request ends up with: the client's when it
// is safe to log and echo, a fresh one otherwise, never empty, never
// longer than 128 bytes, never holding spaces, quotes or control bytes.
func FuzzRequestID(f *testing.F) {
	for _, s := range []string{"", "abc-123", "with space", "quote\"d", "new\nline", "\x00", "ünïcode", string(make([]byte, 200))} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, header string) {
		ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs(RequestIDHeader, header))
		id := RequestID(startRequest(ctx))
		if !validRequestID(id) {
			t.Fatalf("header %q gave unusable id %q", header, id)
		}
		if validRequestID(header) && id != header {
			t.Fatalf("usable header %q replaced by %q", header, id)
		}
		for i := 0; i < len(id); i++ {
			if c := id[i]; c <= ' ' || c > '~' || c == '"' || c == '\'' || c == '\\' {
				t.Fatalf("id %q holds byte %#x", id, c)
			}
		}
	})
}
