// Package metrics is droverd's Prometheus endpoint (`--metrics-addr`,
// on 127.0.0.1 unless told otherwise): Raft commit latency and leader
// changes, gossip members by state, WireGuard handshake age and bytes per
// peer, migrations by outcome with their duration, downtime and bytes,
// drains, and the reconciler's actions and errors. Counters and
// histograms are fed by the parts as things happen (they declare the
// small observer interfaces they need); gauges are read at each scrape.
// See DESIGN.md.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/netmesh"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Members is gossip's view of the machines.
type Members interface {
	Members() []cluster.Member
}

// Mesh reads the WireGuard device.
type Mesh interface {
	Status() (netmesh.Status, error)
}

// Metrics holds drover's metrics and serves them.
type Metrics struct {
	reg *prometheus.Registry

	commit        prometheus.Histogram
	leaderChanges prometheus.Counter
	migrations    *prometheus.CounterVec
	migDuration   prometheus.Histogram
	migDowntime   prometheus.Histogram
	migBytes      prometheus.Counter
	drains        *prometheus.CounterVec
	reconActions  *prometheus.CounterVec
	reconErrors   prometheus.Counter
	replBytes     *prometheus.CounterVec
	replSeconds   *prometheus.CounterVec
	standbyLag    *prometheus.GaugeVec
}

// New makes the metrics.
func New() *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry()}
	m.commit = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "drover_raft_commit_seconds",
		Help:    "Time from proposing a command on this machine to its being applied here.",
		Buckets: []float64{.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10}})
	m.leaderChanges = prometheus.NewCounter(prometheus.CounterOpts{Name: "drover_raft_leader_changes_total",
		Help: "Times this machine saw the Raft leader change."})
	m.migrations = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "drover_migrations_total",
		Help: "Migrations this machine executed, by outcome (done, aborted)."}, []string{"outcome"})
	m.migDuration = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "drover_migration_duration_seconds",
		Help: "Whole migrations this machine executed, start to end.", Buckets: prometheus.ExponentialBuckets(0.5, 2, 12)})
	m.migDowntime = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "drover_migration_downtime_seconds",
		Help:    "Downtime of the migrations this machine executed, from the source's stop to the commit.",
		Buckets: []float64{.1, .2, .3, .5, .75, 1, 2, 5, 10, 30}})
	m.migBytes = prometheus.NewCounter(prometheus.CounterOpts{Name: "drover_migration_sent_bytes_total",
		Help: "Volume bytes sent by the migrations this machine executed."})
	m.drains = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "drover_drains_total",
		Help: "Drains this machine ran, by outcome."}, []string{"outcome"})
	m.reconActions = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "drover_reconcile_actions_total",
		Help: "What this machine's reconciler did to its containers, by action."}, []string{"action"})
	m.reconErrors = prometheus.NewCounter(prometheus.CounterOpts{Name: "drover_reconcile_errors_total",
		Help: "Reconcile passes of this machine that ended in an error."})
	m.replBytes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "drover_standby_sent_bytes_total",
		Help: "Volume bytes this machine sent to standby copies, by service."}, []string{"service"})
	m.replSeconds = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "drover_standby_refresh_seconds_total",
		Help: "Time this machine spent refreshing standby copies, by service."}, []string{"service"})
	m.standbyLag = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "drover_standby_lag_seconds",
		Help: "Age of the newest standby copy of each service this machine runs: what a failover now would lose."}, []string{"service"})
	m.reg.MustRegister(m.commit, m.leaderChanges, m.migrations, m.migDuration, m.migDowntime, m.migBytes,
		m.drains, m.reconActions, m.reconErrors, m.replBytes, m.replSeconds, m.standbyLag, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	for _, o := range []string{"done", "aborted"} {
		m.migrations.WithLabelValues(o)
	}
	return m
}

// Watch reads gossip's members and the WireGuard device at each scrape,
// from what sources gives then (nil ones: this machine is in no cluster).
func (m *Metrics) Watch(sources func() (Members, Mesh)) {
	m.reg.MustRegister(&scraped{sources: sources})
}

// Committed records one command's commit latency (cluster.Observer).
func (m *Metrics) Committed(d time.Duration) { m.commit.Observe(d.Seconds()) }

// LeaderChanged records a change of leader (cluster.Observer).
func (m *Metrics) LeaderChanged() { m.leaderChanges.Inc() }

// MigrationEnded records a migration this machine executed.
func (m *Metrics) MigrationEnded(outcome string, took, downtime time.Duration, bytes uint64) {
	m.migrations.WithLabelValues(outcome).Inc()
	m.migDuration.Observe(took.Seconds())
	if downtime > 0 {
		m.migDowntime.Observe(downtime.Seconds())
	}
	m.migBytes.Add(float64(bytes))
}

// DrainEnded records a drain this machine ran.
func (m *Metrics) DrainEnded(outcome string) { m.drains.WithLabelValues(outcome).Inc() }

// ReconcileAction records what the reconciler did ("start", "recreate",
// "remove").
func (m *Metrics) ReconcileAction(action string) { m.reconActions.WithLabelValues(action).Inc() }

// Replicated counts one refresh of a service's standby copy.
func (m *Metrics) Replicated(service string, bytes uint64, took time.Duration) {
	m.replBytes.WithLabelValues(service).Add(float64(bytes))
	m.replSeconds.WithLabelValues(service).Add(took.Seconds())
}

// StandbyLag sets the age of a service's newest standby copy.
func (m *Metrics) StandbyLag(service string, lag time.Duration) {
	m.standbyLag.WithLabelValues(service).Set(lag.Seconds())
}

// ReconcileError records a reconcile pass that failed.
func (m *Metrics) ReconcileError() { m.reconErrors.Inc() }

// Serve answers /metrics on addr until ctx ends.
func (m *Metrics) Serve(ctx context.Context, addr string, logger *slog.Logger) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics on %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorLog: slogAdapter{logger}}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// slogAdapter lets promhttp log through slog.
type slogAdapter struct{ l *slog.Logger }

func (a slogAdapter) Println(v ...any) { a.l.Warn("metrics", "err", fmt.Sprint(v...)) }

// scraped reads gossip and the mesh at each scrape.
type scraped struct {
	sources func() (Members, Mesh)
}

var (
	membersDesc   = prometheus.NewDesc("drover_gossip_members", "Machines gossip sees, by liveness.", []string{"state"}, nil)
	handshakeDesc = prometheus.NewDesc("drover_wireguard_last_handshake_age_seconds", "Time since the last WireGuard handshake with each peer.", []string{"peer"}, nil)
	rxDesc        = prometheus.NewDesc("drover_wireguard_received_bytes_total", "Bytes received from each WireGuard peer.", []string{"peer"}, nil)
	txDesc        = prometheus.NewDesc("drover_wireguard_sent_bytes_total", "Bytes sent to each WireGuard peer.", []string{"peer"}, nil)
)

func (s *scraped) Describe(ch chan<- *prometheus.Desc) {
	ch <- membersDesc
	ch <- handshakeDesc
	ch <- rxDesc
	ch <- txDesc
}

func (s *scraped) Collect(ch chan<- prometheus.Metric) {
	counts := map[string]int{}
	for _, l := range []cluster.Liveness{cluster.LivenessAlive, cluster.LivenessSuspect, cluster.LivenessFailed, cluster.LivenessLeft} {
		counts[string(l)] = 0
	}
	members, mesh := s.sources()
	names := map[string]string{}
	if members != nil {
		for _, mb := range members.Members() {
			counts[string(mb.Liveness)]++
			names[mb.WGPublicKey] = mb.Name
		}
	}
	for state, n := range counts {
		ch <- prometheus.MustNewConstMetric(membersDesc, prometheus.GaugeValue, float64(n), state)
	}
	if mesh == nil {
		return
	}
	st, err := mesh.Status()
	if err != nil {
		return
	}
	for _, p := range st.Peers {
		peer := names[p.PublicKey]
		if peer == "" {
			peer = p.PublicKey
		}
		if !p.LastHandshake.IsZero() {
			ch <- prometheus.MustNewConstMetric(handshakeDesc, prometheus.GaugeValue, time.Since(p.LastHandshake).Seconds(), peer)
		}
		ch <- prometheus.MustNewConstMetric(rxDesc, prometheus.CounterValue, float64(p.RxBytes), peer)
		ch <- prometheus.MustNewConstMetric(txDesc, prometheus.CounterValue, float64(p.TxBytes), peer)
	}
}
