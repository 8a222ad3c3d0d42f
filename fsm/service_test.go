package fsm

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

var svcPrefix = netip.MustParsePrefix("10.211.0.0/16")

func webSpec() ServiceSpec {
	return ServiceSpec{Name: "web", Image: "img:1", Ports: []PortMapping{{Port: 80, Target: 8080, Protocol: "tcp"}},
		Volumes: []VolumeMount{{Name: "data", MountPath: "/data", QuotaBytes: 1 << 20}}}
}

func deployState(t *testing.T) *State {
	s := NewState()
	mustApply(t, s, RegisterMachine{Machine: machine("a1", "alpha"), At: t0})
	mustApply(t, s, RegisterMachine{Machine: machine("b2", "beta"), At: t0})
	mustApply(t, s, AcquireLock{Namespace: "shop", Holder: "d", Lease: time.Minute, At: t0})
	return s
}

func TestPutServiceLifecycle(t *testing.T) {
	s := deployState(t)
	sv := mustApply(t, s, PutService{Namespace: "shop", Holder: "d", Spec: webSpec(), MachineID: "a1", ServicePrefix: svcPrefix, At: t0}).(Service)
	if sv.Generation != 1 || sv.ServiceIP.String() != "10.211.0.1" || sv.MachineID != "a1" {
		t.Fatalf("new service %+v", sv)
	}
	if v, ok := s.Volume("shop", "data"); !ok || v.OwnerID != "a1" || v.QuotaBytes != 1<<20 {
		t.Fatalf("volume %+v %v", v, ok)
	}
	// The same spec again changes nothing; a new spec bumps the generation.
	if again := mustApply(t, s, PutService{Namespace: "shop", Holder: "d", Spec: webSpec(), MachineID: "a1", ServicePrefix: svcPrefix, At: t0}).(Service); again.Generation != 1 {
		t.Fatalf("unchanged spec bumped generation: %+v", again)
	}
	changed := webSpec()
	changed.Env = map[string]string{"A": "1"}
	sv = mustApply(t, s, PutService{Namespace: "shop", Holder: "d", Spec: changed, MachineID: "a1", ServicePrefix: svcPrefix, At: t0}).(Service)
	if sv.Generation != 2 || sv.ServiceIP.String() != "10.211.0.1" {
		t.Fatalf("changed service %+v", sv)
	}
	// Status: only from the owner, only for the current generation.
	expectRule(t, s, SetServiceStatus{Namespace: "shop", Name: "web", MachineID: "b2", Generation: 2, Ready: true, At: t0}, ErrInvalid)
	expectRule(t, s, SetServiceStatus{Namespace: "shop", Name: "web", MachineID: "a1", Generation: 1, Ready: true, At: t0}, ErrInvalid)
	sv = mustApply(t, s, SetServiceStatus{Namespace: "shop", Name: "web", MachineID: "a1", Generation: 2, Ready: true, At: t0}).(Service)
	if !sv.Status.Ready || sv.Status.Generation != 2 {
		t.Fatalf("status %+v", sv.Status)
	}
	// Moving it is a migration, not a deploy.
	expectRule(t, s, PutService{Namespace: "shop", Holder: "d", Spec: changed, MachineID: "b2", ServicePrefix: svcPrefix, At: t0}, ErrInvalid)
	// Another service may not take its volume, and a service elsewhere may
	// not use a volume owned here.
	other := webSpec()
	other.Name = "api"
	expectRule(t, s, PutService{Namespace: "shop", Holder: "d", Spec: other, MachineID: "a1", ServicePrefix: svcPrefix, At: t0}, ErrInvalid)
	expectRule(t, s, PutService{Namespace: "shop", Holder: "d", Spec: other, MachineID: "b2", ServicePrefix: svcPrefix, At: t0}, ErrVolumeElsewhere)
	// Without the lock, nothing.
	expectRule(t, s, PutService{Namespace: "shop", Holder: "x", Spec: changed, MachineID: "a1", ServicePrefix: svcPrefix, At: t0}, ErrLockNotHeld)
	expectRule(t, s, RemoveService{Namespace: "shop", Name: "web", Holder: "x", At: t0}, ErrLockNotHeld)
	mustApply(t, s, RemoveService{Namespace: "shop", Name: "web", Holder: "d", At: t0})
	if _, ok := s.Service("shop", "web"); ok {
		t.Fatal("service still there")
	}
	if _, ok := s.Volume("shop", "data"); !ok {
		t.Fatal("removing a service removed its volume")
	}
	// Snapshots carry services and volumes.
	mustApply(t, s, PutService{Namespace: "shop", Holder: "d", Spec: webSpec(), MachineID: "a1", ServicePrefix: svcPrefix, At: t0})
	restored, err := ReadSnapshotBytes(snapshotBytes(t, s))
	if err != nil || len(restored.Services()) != 1 || len(restored.Volumes()) != 1 {
		t.Fatalf("restored %v, %d services", err, len(restored.Services()))
	}
}

func TestRemoveVolumeOnlyWhenNothingMountsIt(t *testing.T) {
	s := NewState()
	now := time.Now()
	mustApply(t, s, RegisterMachine{Machine: Machine{ID: "m1", Name: "m1"}, At: now})
	mustApply(t, s, AcquireLock{Namespace: "shop", Holder: "h", Lease: time.Hour, At: now})
	spec := ServiceSpec{Name: "web", Image: "img", Volumes: []VolumeMount{{Name: "data", MountPath: "/data", QuotaBytes: 1 << 20}}}
	mustApply(t, s, PutService{Namespace: "shop", Holder: "h", Spec: spec, MachineID: "m1", ServicePrefix: netip.MustParsePrefix("10.211.0.0/16"), At: now})
	if _, err := s.ApplyCommand(RemoveVolume{Namespace: "shop", Name: "data", Holder: "h", At: now}); err == nil || !strings.Contains(err.Error(), "mounted by service shop/web") {
		t.Fatalf("remove of a mounted volume: %v", err)
	}
	mustApply(t, s, RemoveService{Namespace: "shop", Name: "web", Holder: "h", At: now})
	if _, err := s.ApplyCommand(RemoveVolume{Namespace: "shop", Name: "data", Holder: "other", At: now}); err == nil {
		t.Fatal("a volume removed without the namespace lock")
	}
	mustApply(t, s, RemoveVolume{Namespace: "shop", Name: "data", Holder: "h", At: now})
	if _, ok := s.Volume("shop", "data"); ok {
		t.Fatal("the volume is still in the facts")
	}
	if _, err := s.ApplyCommand(RemoveVolume{Namespace: "shop", Name: "data", Holder: "h", At: now}); err == nil {
		t.Fatal("an unknown volume removed")
	}
}
