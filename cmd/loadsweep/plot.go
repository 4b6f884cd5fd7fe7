package main

import (
	"fmt"
	"image/color"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// writePlot draws latency (p50 and p99, ms, log scale) against achieved
// throughput for every point of a sweep, closed-loop points joined by
// lines and labelled with their concurrency, open-loop points with their
// rate, and saves it as a PNG at path.
func writePlot(s ModelSweep, path string) error {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("%s on %s: latency vs throughput", s.Model, s.Backend)
	p.X.Label.Text = "throughput (images/s)"
	p.X.Min = 0
	p.Y.Label.Text = "latency (ms, log scale)"
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	p.Add(plotter.NewGrid())
	p.Legend.Top = true
	p.Legend.Left = true

	blue := color.RGBA{R: 31, G: 119, B: 180, A: 255}
	orange := color.RGBA{R: 255, G: 127, B: 14, A: 255}
	for _, mode := range []string{ModeClosed, ModeOpen} {
		var p50, p99 plotter.XYs
		var labels []string
		for _, pt := range s.Points {
			// A point with no success has no latency worth plotting on a
			// log axis.
			if pt.Mode != mode || pt.Requests-pt.Errors <= 0 || pt.P50 <= 0 {
				continue
			}
			p50 = append(p50, plotter.XY{X: pt.Throughput, Y: float64(pt.P50) / 1e6})
			p99 = append(p99, plotter.XY{X: pt.Throughput, Y: float64(pt.P99) / 1e6})
			labels = append(labels, pt.Label())
		}
		if len(p50) == 0 {
			continue
		}
		for _, series := range []struct {
			name  string
			xys   plotter.XYs
			color color.Color
		}{{"p50", p50, blue}, {"p99", p99, orange}} {
			sc, err := plotter.NewScatter(series.xys)
			if err != nil {
				return err
			}
			sc.GlyphStyle = draw.GlyphStyle{Color: series.color, Radius: vg.Points(3), Shape: draw.CircleGlyph{}}
			if mode == ModeOpen {
				sc.GlyphStyle.Shape = draw.TriangleGlyph{}
			}
			p.Add(sc)
			name := fmt.Sprintf("%s, %s loop", series.name, mode)
			if mode == ModeClosed {
				ln, err := plotter.NewLine(series.xys)
				if err != nil {
					return err
				}
				ln.LineStyle.Color = series.color
				ln.LineStyle.Width = vg.Points(1)
				p.Add(ln)
				p.Legend.Add(name, ln, sc)
			} else {
				p.Legend.Add(name, sc)
			}
		}
		lb, err := plotter.NewLabels(plotter.XYLabels{XYs: p99, Labels: labels})
		if err != nil {
			return err
		}
		for i := range lb.TextStyle {
			lb.TextStyle[i].Font.Size = vg.Points(7)
		}
		lb.Offset = vg.Point{X: vg.Points(4), Y: vg.Points(2)}
		p.Add(lb)
	}
	return p.Save(7*vg.Inch, 4.5*vg.Inch, path)
}
