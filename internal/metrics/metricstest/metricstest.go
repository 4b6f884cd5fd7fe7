// Package metricstest finds series in gathered or scraped metric families,
// for tests that check what operators see.
package metricstest

import dto "github.com/prometheus/client_model/go"

// Matching returns the series of f whose labels include every name and
// value of want, in f's order; none for a nil family.
func Matching(f *dto.MetricFamily, want map[string]string) []*dto.Metric {
	var out []*dto.Metric
next:
	for _, m := range f.GetMetric() {
		got := make(map[string]string, len(m.GetLabel()))
		for _, l := range m.GetLabel() {
			got[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if got[k] != v {
				continue next
			}
		}
		out = append(out, m)
	}
	return out
}
