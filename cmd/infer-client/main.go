// Command infer-client classifies or detects images and video with a
// visionserve server, lists its models and measures it under load:
//
//	infer-client classify|detect --addr HOST:PORT --model NAME [--json] [--draw OUT] FILE|DIR...
//	infer-client load --model NAME --concurrency N --duration D|--requests N FILE
//	infer-client models
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/visionserve/visionserve/internal/client"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := client.Main(ctx, os.Args[1:], os.Stdout, os.Stderr, os.Getenv)
	stop()
	os.Exit(code)
}
