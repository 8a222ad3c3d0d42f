package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/drover-sh/drover/agent/runtime"
	"github.com/drover-sh/drover/cluster"
	"github.com/drover-sh/drover/fsm"
	"github.com/drover-sh/drover/volume"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// checkState is the reconciler's memory of one service's readiness.
type checkState struct {
	generation  uint64
	containerID string
	failures    int
	reported    string // "ready" or the error last reported for generation
}

// workloads runs what this machine owns: it is the reconciler.
type workloads struct {
	a      *Agent
	rt     *runtime.Docker
	vols   *volume.ZFS // nil when this machine has no ZFS parent
	checks map[string]*checkState
}

func (a *Agent) openWorkloads() (*workloads, error) {
	rt, err := runtime.NewDocker(a.cfg.DockerHost, a.machineID)
	if err != nil {
		return nil, err
	}
	w := &workloads{a: a, rt: rt, checks: map[string]*checkState{}}
	if a.cfg.ZFSParent != "" {
		if w.vols, err = volume.NewZFS(a.cfg.ZFSParent); err != nil {
			rt.Close()
			return nil, fmt.Errorf("volumes under %s: %w", a.cfg.ZFSParent, err)
		}
	}
	return w, nil
}

// runWorkloads reconciles every couple of seconds until ctx ends.
func (a *Agent) runWorkloads(ctx context.Context, n *cluster.Node, w *workloads) {
	defer a.wg.Done()
	tick := time.NewTicker(2 * time.Second)
	defer tick.Stop()
	if !a.waitCaughtUp(ctx, n, tick.C, "workloads") {
		return
	}
	a.logger.Info("fact store caught up: reconciling workloads")
	lastCapacity := time.Time{}
	for {
		if time.Since(lastCapacity) > 30*time.Second {
			w.reportCapacity(n)
			lastCapacity = time.Now()
		}
		if err := w.reconcile(ctx, n); err != nil && ctx.Err() == nil {
			a.logger.Warn("reconciling workloads", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// waitCaughtUp returns once this machine's facts have caught up with the
// leader, trying again at every tick, or false when ctx ends. Whatever
// acts on facts after a start waits for it: a store still empty after a
// restart would look like "this machine owns nothing".
func (a *Agent) waitCaughtUp(ctx context.Context, n *cluster.Node, tick <-chan time.Time, who string) bool {
	for {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := n.CaughtUp(cctx)
		cancel()
		if err == nil {
			return true
		}
		a.logger.Debug("waiting for the fact store to catch up", "for", who, "err", err)
		select {
		case <-ctx.Done():
			return false
		case <-tick:
		}
	}
}

// reportCapacity gossips free memory and volume space, rounded so small
// changes do not churn the facts.
func (w *workloads) reportCapacity(n *cluster.Node) {
	const step = 256 << 20
	mem := memAvailable() / step * step
	var disk uint64
	if w.vols != nil {
		if free, err := w.vols.FreeBytes(); err == nil {
			disk = free / step * step
		}
	}
	if m := n.LocalMeta(); m.MemoryBytes == mem && m.DiskBytes == disk {
		return
	}
	if err := n.SetMeta(func(m *cluster.Meta) { m.MemoryBytes, m.DiskBytes = mem, disk }); err != nil {
		w.a.logger.Warn("gossiping capacity", "err", err)
	}
}

func memAvailable() uint64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemAvailable:" {
			kb, _ := strconv.ParseUint(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

// reconcile makes this machine run exactly the services it owns: it
// starts what is missing, re-creates what changed, adopts what already
// runs as asked (without restarting it), removes what it no longer owns,
// and reports readiness through the fact store. It never starts a service
// whose volume another machine owns.
func (w *workloads) reconcile(ctx context.Context, n *cluster.Node) error {
	self := w.a.machineID
	var owned []fsm.Service
	volumes := map[string]fsm.Volume{}
	// A service being moved to or from this machine is the migration's,
	// not the reconciler's: its containers are left alone, and the target
	// keeps its service IP ready for the start before the commit.
	moving := map[string]bool{}
	var incomingIPs []netip.Addr
	n.Read(func(s *fsm.State) {
		for _, sv := range s.Services() {
			if m, ok := s.ActiveMigration(sv.Namespace, sv.Spec.Name); ok && (m.SourceID == self || m.TargetID == self) {
				moving[sv.Key()] = true
				if m.TargetID == self {
					incomingIPs = append(incomingIPs, sv.ServiceIP)
				}
			}
			if sv.MachineID == self {
				owned = append(owned, sv)
			}
		}
		for _, v := range s.Volumes() {
			volumes[v.Key()] = v
		}
	})
	containers, err := w.rt.List(ctx)
	if err != nil {
		return err
	}
	byKey := map[string]runtime.Container{}
	for _, c := range containers {
		byKey[c.Key()] = c
	}
	ips := incomingIPs
	for _, sv := range owned {
		ips = append(ips, sv.ServiceIP)
	}
	if err := w.setServiceIPs(ips); err != nil {
		return err
	}
	wanted := map[string]bool{}
	for _, sv := range owned {
		wanted[sv.Key()] = true
		if !moving[sv.Key()] {
			w.reconcileService(ctx, n, sv, volumes, byKey[sv.Key()])
		}
	}
	for _, c := range containers {
		if !wanted[c.Key()] && !moving[c.Key()] {
			w.a.logger.Info("removing a container this machine no longer owns", "service", c.Key())
			if err := w.rt.Remove(ctx, c.ID, 10*time.Second); err != nil {
				w.a.logger.Warn("removing container", "service", c.Key(), "err", err)
			}
			delete(w.checks, c.Key())
		}
	}
	return nil
}

func (w *workloads) reconcileService(ctx context.Context, n *cluster.Node, sv fsm.Service, volumes map[string]fsm.Volume, c runtime.Container) {
	key := sv.Key()
	st := w.checks[key]
	if st == nil || st.generation != sv.Generation {
		st = &checkState{generation: sv.Generation}
		if sv.Status.Generation == sv.Generation {
			if sv.Status.Ready {
				st.reported = "ready"
			} else {
				st.reported = sv.Status.Error
			}
		}
		w.checks[key] = st
	}
	rs, err := w.runSpec(sv, volumes)
	if err != nil {
		w.report(ctx, n, sv, st, err)
		return
	}
	if c.ID == "" || c.SpecHash != rs.Hash() || !c.Running {
		if c.ID != "" {
			w.a.logger.Info("re-creating container", "service", key, "generation", sv.Generation)
			if err := w.rt.Remove(ctx, c.ID, 10*time.Second); err != nil {
				w.report(ctx, n, sv, st, err)
				return
			}
		}
		started, err := w.rt.Start(ctx, rs)
		if err != nil {
			w.report(ctx, n, sv, st, err)
			return
		}
		w.a.logger.Info("started container", "service", key, "generation", sv.Generation)
		c = started
		st.failures, st.containerID, st.reported = 0, c.ID, ""
	}
	if st.reported == "ready" && st.containerID == "" {
		st.containerID = c.ID // adopted: ready as reported before
	}
	if st.reported == "ready" {
		return
	}
	rd := rs.Spec.Readiness
	retries := 30
	if rd != nil {
		retries = rd.Retries
		if !c.StartedAt.IsZero() && time.Since(c.StartedAt) < rd.StartPeriod {
			return
		}
	}
	if err := w.rt.CheckOnce(ctx, c, rs); err != nil {
		st.failures++
		if st.failures > retries {
			w.report(ctx, n, sv, st, err)
		}
		return
	}
	w.report(ctx, n, sv, st, nil)
}

// runSpec resolves a service's volumes to datasets this machine owns.
func (w *workloads) runSpec(sv fsm.Service, volumes map[string]fsm.Volume) (runtime.RunSpec, error) {
	rs := runtime.RunSpec{Namespace: sv.Namespace, Spec: sv.Spec, Generation: sv.Generation, ServiceIP: sv.ServiceIP, Mounts: map[string]string{}}
	for _, vm := range sv.Spec.Volumes {
		v, ok := volumes[sv.Namespace+"/"+vm.Name]
		if !ok || v.OwnerID != w.a.machineID {
			return rs, fmt.Errorf("volume %s/%s is not owned by this machine: not starting %s", sv.Namespace, vm.Name, sv.Key())
		}
		if w.vols == nil {
			return rs, fmt.Errorf("this machine has no ZFS parent dataset (--zfs-parent): cannot hold volume %s/%s", sv.Namespace, vm.Name)
		}
		info, err := w.vols.Ensure(sv.Namespace, vm.Name, vm.QuotaBytes)
		if err != nil {
			return rs, err
		}
		rs.Mounts[vm.Name] = info.Mountpoint
	}
	return rs, nil
}

// report writes a service's readiness (err nil) or failure to the facts,
// once per generation and outcome.
func (w *workloads) report(ctx context.Context, n *cluster.Node, sv fsm.Service, st *checkState, err error) {
	outcome := "ready"
	if err != nil {
		outcome = err.Error()
	}
	if st.reported == outcome {
		return
	}
	if err != nil {
		w.a.logger.Warn("service failed", "service", sv.Key(), "generation", sv.Generation, "err", err)
	}
	cmd := fsm.SetServiceStatus{Namespace: sv.Namespace, Name: sv.Spec.Name, MachineID: w.a.machineID,
		Generation: sv.Generation, Ready: err == nil, Error: errString(err), At: time.Now()}
	actx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, aerr := n.Apply(actx, cmd); aerr != nil {
		w.a.logger.Warn("reporting service status", "service", sv.Key(), "err", aerr)
		return
	}
	st.reported = outcome
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// addServiceIP puts one service IP on the loopback now (a migration's
// target, before the reconciler's next round); removeServiceIP takes one
// off (an aborted migration's target).
func (w *workloads) addServiceIP(ip netip.Addr) error    { return w.changeServiceIP(ip, true) }
func (w *workloads) removeServiceIP(ip netip.Addr) error { return w.changeServiceIP(ip, false) }

func (w *workloads) changeServiceIP(ip netip.Addr, add bool) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(32, 32)}}
	if add {
		if err := netlink.AddrAdd(lo, addr); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("adding service IP %s: %w", ip, err)
		}
		return nil
	}
	if err := netlink.AddrDel(lo, addr); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
		return fmt.Errorf("removing service IP %s: %w", ip, err)
	}
	return nil
}

// setServiceIPs makes the /32s on the loopback exactly the service IPs of
// the services this machine owns (Docker publishes their ports there).
func (w *workloads) setServiceIPs(want []netip.Addr) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	addrs, err := netlink.AddrList(lo, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("loopback addresses: %w", err)
	}
	wantSet := map[netip.Addr]bool{}
	for _, a := range want {
		wantSet[a] = true
	}
	for _, a := range addrs {
		ip, _ := netip.AddrFromSlice(a.IP)
		ip = ip.Unmap()
		ones, _ := a.Mask.Size()
		if ones != 32 || !w.a.cfg.ServicePrefix.Contains(ip) {
			continue
		}
		if wantSet[ip] {
			delete(wantSet, ip)
			continue
		}
		if err := netlink.AddrDel(lo, &a); err != nil {
			return fmt.Errorf("removing service IP %s: %w", ip, err)
		}
	}
	for ip := range wantSet {
		ipn := &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(32, 32)}
		if err := netlink.AddrAdd(lo, &netlink.Addr{IPNet: ipn}); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("adding service IP %s: %w", ip, err)
		}
	}
	return nil
}
