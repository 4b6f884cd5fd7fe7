package metrics

import (
	"github.com/visionserve/visionserve/pkg/batcher"
	"github.com/visionserve/visionserve/pkg/model"
)

// ModelObserver returns the model.Observer that keeps every model's
// series: its state in ModelState, and once Ready its backend, load and
// warm-up times and its queue (read at scrape time). A model that turns
// Unavailable or is removed loses its serving series; a removed one loses
// its state too. It is nil-safe: a nil Metrics observes nothing.
func (m *Metrics) ModelObserver() model.Observer { return modelObserver{m} }

type modelObserver struct{ m *Metrics }

func (o modelObserver) ModelState(md *model.Model, s model.State, _ error) {
	m := o.m
	if m == nil {
		return
	}
	for _, st := range model.States {
		v := 0.0
		if st == s {
			v = 1
		}
		m.state.WithLabelValues(md.Name, st.String()).Set(v)
	}
	switch s {
	case model.Ready:
		m.ModelLoaded(md.Name, md.Runner.Backend(), md.LoadTime, md.WarmupTime)
		if q, ok := md.Runner.(interface{ Stats() batcher.Stats }); ok {
			m.TrackQueue(md.Name, QueueStatsOf(q.Stats))
		}
	case model.Unavailable:
		m.ModelUnloaded(md.Name)
	}
}

func (o modelObserver) ModelRemoved(name string) {
	m := o.m
	if m == nil {
		return
	}
	m.ModelUnloaded(name)
	for _, st := range model.States {
		m.state.DeleteLabelValues(name, st.String())
	}
}
