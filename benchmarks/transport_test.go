package benchmarks

import (
	"context"
	"net"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// echoVision answers Classify without looking at the image: what is left of
// a served call is gRPC itself, protobuf and HTTP/2 on loopback.
type echoVision struct {
	visionv1.UnimplementedVisionServiceServer
}

func (echoVision) Classify(_ context.Context, r *visionv1.ClassifyRequest) (*visionv1.ClassifyResponse, error) {
	return &visionv1.ClassifyResponse{Model: r.GetModel(), Results: make([]*visionv1.ImageResult, len(r.GetImages()))}, nil
}

// BenchmarkTransport is the floor under BenchmarkOverhead's added p50: one
// client calls, one at a time, a gRPC server on a 127.0.0.1 TCP listener
// that answers Classify at once, carrying the classifier's test image (the
// same bytes and options as the served benchmarks). Its p50 is what any
// served call pays on this machine before the server does any work.
func BenchmarkTransport(b *testing.B) {
	srv := grpc.NewServer(append(windowServerOptions(), grpc.MaxRecvMsgSize(64<<20))...)
	visionv1.RegisterVisionServiceServer(srv, echoVision{})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	defer func() { srv.Stop(); <-done }()
	conn, err := grpc.NewClient(lis.Addr().String(), append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, windowDialOptions()...)...)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	client := visionv1.NewVisionServiceClient(conn)
	m, err := loadModel("mobilenetv3_large")
	if err != nil {
		skipOrFail(b, err)
	}
	img := testImage(m)
	req := &visionv1.ClassifyRequest{Model: "echo", Images: []*visionv1.Image{{Source: &visionv1.Image_Encoded{Encoded: img}}}}
	measure(b, 1, 1, func(ctx context.Context) error {
		_, err := client.Classify(ctx, req)
		return err
	})
	b.ReportMetric(float64(len(img))/(1<<10), "image-KiB")
}
