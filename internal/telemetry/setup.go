// Package telemetry sets up visionserve's traces and logs: the
// OpenTelemetry tracer provider and exporter chosen by the standard OTEL_*
// environment variables, W3C trace-context propagation, slog loggers that
// stamp every line with the request id and trace id, the gRPC interceptors
// that give each request its id, and the spans of the pipeline stages and
// of the batches that serve many requests at once.
package telemetry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strings"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	"google.golang.org/grpc"
)

// Options configure Setup.
type Options struct {
	// ServiceName is service.name unless OTEL_SERVICE_NAME or
	// OTEL_RESOURCE_ATTRIBUTES set it; "visionserve" when empty.
	ServiceName string
	// ServiceVersion is service.version.
	ServiceVersion string
	// Exporter, when set, receives the spans whatever the environment
	// says (tests pass tracetest.NewInMemoryExporter()).
	Exporter sdktrace.SpanExporter
	// Logger gets the line that says where traces go; slog.Default() when nil.
	Logger *slog.Logger
}

// Setup installs the global propagator (W3C trace context and baggage)
// and, when the environment asks for traces, a tracer provider exporting
// them over OTLP. The environment is the standard one:
//
//   - OTEL_SDK_DISABLED=true, or OTEL_TRACES_EXPORTER=none: no traces.
//   - OTEL_TRACES_EXPORTER=otlp, or unset with OTEL_EXPORTER_OTLP_ENDPOINT
//     or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT set: OTLP, over
//     OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL = http/protobuf (the default)
//     or grpc; endpoint, headers, timeout, TLS, sampler
//     (OTEL_TRACES_SAMPLER) and batching (OTEL_BSP_*) as those
//     variables say.
//   - nothing set: no traces. The tracer provider stays OpenTelemetry's
//     no-op: no exporter, no goroutine, no connection attempts; incoming
//     trace context is still passed on to what the server calls.
//
// shutdown flushes the spans still buffered and stops the exporter; call
// it once, after the gRPC server stopped. A value Setup cannot use (an
// unknown exporter or protocol) is an error, not a silent default.
func Setup(ctx context.Context, opts Options) (shutdown func(context.Context) error, err error) {
	// The OTLP exporters read their OTEL_EXPORTER_OTLP_* settings from
	// the process environment themselves, so Setup reads it there too:
	// one source, no chance of the two disagreeing.
	getenv := os.Getenv
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{}))
	nothing := func(context.Context) error { return nil }

	exp := opts.Exporter
	if exp == nil {
		kind, protocol, err := exporterFromEnv(getenv)
		if err != nil {
			return nothing, err
		}
		switch kind {
		case "none":
			otel.SetTracerProvider(noop.NewTracerProvider())
			log.Info("tracing off", "reason", "no OTEL_TRACES_EXPORTER or OTEL_EXPORTER_OTLP_ENDPOINT set")
			return nothing, nil
		case "otlp":
			// Both exporters read the OTEL_EXPORTER_OTLP_* variables
			// themselves; neither connects before the first export.
			if protocol == "grpc" {
				exp, err = otlptracegrpc.New(ctx)
			} else {
				exp, err = otlptracehttp.New(ctx)
			}
			if err != nil {
				return nothing, fmt.Errorf("creating the OTLP %s trace exporter: %w", protocol, err)
			}
			log.Info("tracing on", "exporter", "otlp", "protocol", protocol)
		}
	}

	name := opts.ServiceName
	if name == "" {
		name = "visionserve"
	}
	attrs := []resource.Option{
		resource.WithAttributes(semconv.ServiceName(name)),
		resource.WithTelemetrySDK(),
		resource.WithHost(),
		resource.WithProcessPID(),
	}
	if opts.ServiceVersion != "" {
		attrs = append(attrs, resource.WithAttributes(semconv.ServiceVersion(opts.ServiceVersion)))
	}
	// The environment comes last so that OTEL_SERVICE_NAME and
	// OTEL_RESOURCE_ATTRIBUTES override the defaults above.
	attrs = append(attrs, resource.WithDetectors(envDetector{getenv}))
	res, err := resource.New(ctx, attrs...)
	if err != nil && !errors.Is(err, resource.ErrPartialResource) {
		_ = exp.Shutdown(ctx)
		return nothing, fmt.Errorf("building the trace resource: %w", err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
	otel.SetTracerProvider(tp)
	return tp.Shutdown, nil
}

// exporterFromEnv picks the trace exporter and OTLP protocol as the
// OpenTelemetry environment variable specification says, except that with
// nothing set it picks none rather than OTLP to localhost: a server that
// nobody asked to trace must not try to connect anywhere.
func exporterFromEnv(getenv func(string) string) (kind, protocol string, err error) {
	if strings.EqualFold(strings.TrimSpace(getenv("OTEL_SDK_DISABLED")), "true") {
		return "none", "", nil
	}
	kind = "none"
	if getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != "" {
		kind = "otlp"
	}
	if v := strings.TrimSpace(getenv("OTEL_TRACES_EXPORTER")); v != "" {
		kind = ""
		// The variable is a list; visionserve takes one exporter.
		for _, e := range strings.Split(v, ",") {
			switch e = strings.ToLower(strings.TrimSpace(e)); e {
			case "none", "otlp":
				if kind != "" && kind != e {
					return "", "", fmt.Errorf("OTEL_TRACES_EXPORTER=%q: choose either none or otlp", v)
				}
				kind = e
			default:
				return "", "", fmt.Errorf("OTEL_TRACES_EXPORTER=%q: exporter %q is not supported (otlp or none)", v, e)
			}
		}
	}
	if kind != "otlp" {
		return kind, "", nil
	}
	protocol = getenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
	if protocol == "" {
		protocol = getenv("OTEL_EXPORTER_OTLP_PROTOCOL")
	}
	switch protocol = strings.TrimSpace(protocol); protocol {
	case "":
		protocol = "http/protobuf"
	case "grpc", "http/protobuf":
	default:
		return "", "", fmt.Errorf("OTLP protocol %q is not supported (grpc or http/protobuf)", protocol)
	}
	return kind, protocol, nil
}

// envDetector reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES. (The
// SDK's own detector does too, but ignores a malformed value silently;
// this one makes it an error.)
type envDetector struct{ getenv func(string) string }

// Detect implements resource.Detector.
func (d envDetector) Detect(context.Context) (*resource.Resource, error) {
	var kvs []attribute.KeyValue
	if v := d.getenv("OTEL_RESOURCE_ATTRIBUTES"); v != "" {
		for _, pair := range strings.Split(v, ",") {
			k, val, ok := strings.Cut(pair, "=")
			if !ok || strings.TrimSpace(k) == "" {
				return nil, fmt.Errorf("OTEL_RESOURCE_ATTRIBUTES: %q is not key=value", pair)
			}
			// Values are percent-encoded, as the specification says.
			decoded, err := url.PathUnescape(strings.TrimSpace(val))
			if err != nil {
				return nil, fmt.Errorf("OTEL_RESOURCE_ATTRIBUTES: %q: %w", pair, err)
			}
			kvs = append(kvs, attribute.String(strings.TrimSpace(k), decoded))
		}
	}
	if v := d.getenv("OTEL_SERVICE_NAME"); v != "" {
		kvs = append(kvs, semconv.ServiceName(v))
	}
	return resource.NewSchemaless(kvs...), nil
}

// GRPCServerOption instruments a gRPC server with OpenTelemetry: a server
// span per call, its parent taken from the caller's W3C trace context.
// With tracing off it costs a no-op span per call.
func GRPCServerOption() grpc.ServerOption {
	return grpc.StatsHandler(otelgrpc.NewServerHandler())
}

// Tracer returns the tracer of visionserve's own spans, from the global
// provider Setup installed.
func Tracer() trace.Tracer {
	return otel.Tracer("github.com/visionserve/visionserve")
}
