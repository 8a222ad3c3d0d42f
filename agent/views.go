package agent

import (
	"context"
	"time"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/agent/probe"
	"github.com/drover-sh/drover/fsm"
)

// The control API's backend, delegated to the parts that own each job.

// DeployPreview shows what a manifest would change. It changes nothing.
func (a *Agent) DeployPreview(ctx context.Context, req ctlapi.DeployRequest) (ctlapi.DeployPlan, error) {
	p, err := a.require()
	if err != nil {
		return ctlapi.DeployPlan{}, err
	}
	return p.deploy.Preview(ctx, req)
}

// Deploy applies a manifest and waits until what it changed is ready.
func (a *Agent) Deploy(ctx context.Context, req ctlapi.DeployRequest, emit func(ctlapi.DeployEvent)) (ctlapi.DeployResult, error) {
	p, err := a.require()
	if err != nil {
		return ctlapi.DeployResult{}, err
	}
	return p.deploy.Apply(ctx, req, emit)
}

// RenderManifest gives the manifest that moves a service.
func (a *Agent) RenderManifest(ctx context.Context, req ctlapi.MigrateRequest) (ctlapi.RenderedManifest, error) {
	p, err := a.require()
	if err != nil {
		return ctlapi.RenderedManifest{}, err
	}
	return p.deploy.RenderManifest(ctx, req)
}

// Services lists every service with where it runs and whether it is ready.
func (a *Agent) Services(context.Context) ([]ctlapi.Service, error) {
	p, err := a.require()
	if err != nil {
		return nil, err
	}
	return p.deploy.Services(), nil
}

// Volumes lists every volume; this machine adds what its ZFS knows of the
// volumes it owns.
func (a *Agent) Volumes(context.Context) ([]ctlapi.Volume, error) {
	p, err := a.require()
	if err != nil {
		return nil, err
	}
	var out []ctlapi.Volume
	mine := map[int]bool{}
	p.node.Read(func(s *fsm.State) {
		standbys := map[string]fsm.Service{} // volume key -> the service whose standby copies it
		for _, sv := range s.Services() {
			for _, vm := range sv.Spec.Volumes {
				if sv.StandbyID != "" {
					standbys[sv.Namespace+"/"+vm.Name] = sv
				}
			}
		}
		for _, v := range s.Volumes() {
			mine[len(out)] = v.OwnerID == a.machineID
			row := ctlapi.Volume{Namespace: v.Namespace, Name: v.Name, Owner: s.NameOf(v.OwnerID), QuotaBytes: v.QuotaBytes}
			if sv, ok := standbys[v.Key()]; ok {
				row.Standby = s.NameOf(sv.StandbyID)
				if sv.Replica != nil {
					row.Lag = ctlapi.Duration(time.Since(sv.Replica.TakenAt))
				}
			}
			out = append(out, row)
		}
	})
	if p.vols == nil {
		return out, nil
	}
	for i, row := range out {
		if !mine[i] {
			continue
		}
		info, err := p.vols.Get(row.Namespace, row.Name)
		if err != nil {
			continue
		}
		out[i].UsedBytes, out[i].Dataset = info.ReferencedBytes, info.Dataset
		if k := len(info.Snapshots); k > 0 {
			out[i].NewestSnapshot = info.Snapshots[k-1].Name
		}
	}
	return out, nil
}

// Migrate moves a service and its volumes to another machine.
func (a *Agent) Migrate(ctx context.Context, req ctlapi.MigrateRequest, emit func(ctlapi.MigrationEvent)) (ctlapi.MigrationInfo, error) {
	p, err := a.require()
	if err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	return p.mig.Migrate(ctx, req, emit)
}

// Events passes the changes of the facts this machine kept, and with
// req.Follow the ones to come.
func (a *Agent) Events(ctx context.Context, req ctlapi.EventsRequest, emit func(ctlapi.Event)) (ctlapi.EventsEnd, error) {
	return ctlapi.EventsEnd{}, a.events.Follow(ctx, req.Follow, emit)
}

// RemoveNamespace removes a namespace's services; volumes stay.
func (a *Agent) RemoveNamespace(ctx context.Context, ns string, req ctlapi.RemoveRequest) (ctlapi.RemoveResult, error) {
	p, err := a.require()
	if err != nil {
		return ctlapi.RemoveResult{}, err
	}
	return p.deploy.Remove(ctx, ns, req.Volumes)
}

// RestartService restarts a service where it runs.
func (a *Agent) RestartService(ctx context.Context, service string) (ctlapi.RestartResult, error) {
	p, err := a.require()
	if err != nil {
		return ctlapi.RestartResult{}, err
	}
	return p.svcs.Restart(ctx, service)
}

// Failover fails a service over to its standby.
func (a *Agent) Failover(ctx context.Context, req ctlapi.FailoverRequest) (ctlapi.FailoverResult, error) {
	p, err := a.require()
	if err != nil {
		return ctlapi.FailoverResult{}, err
	}
	return p.standby.Failover(ctx, req)
}

// SetSecret seals a secret in the facts.
func (a *Agent) SetSecret(ctx context.Context, req ctlapi.SecretRequest) (ctlapi.SecretInfo, error) {
	p, err := a.require()
	if err != nil {
		return ctlapi.SecretInfo{}, err
	}
	return p.secrets.Set(ctx, req, p.svcs)
}

// Secrets lists the secrets.
func (a *Agent) Secrets(context.Context) ([]ctlapi.SecretInfo, error) {
	p, err := a.require()
	if err != nil {
		return nil, err
	}
	return p.secrets.List(), nil
}

// RemoveSecret forgets a secret no service uses.
func (a *Agent) RemoveSecret(ctx context.Context, secret string) error {
	p, err := a.require()
	if err != nil {
		return err
	}
	return p.secrets.Remove(ctx, secret)
}

// ServiceLogs passes a service's log lines from wherever it runs.
func (a *Agent) ServiceLogs(ctx context.Context, req ctlapi.LogsRequest, emit func(ctlapi.LogLine)) (ctlapi.LogsResult, error) {
	p, err := a.require()
	if err != nil {
		return ctlapi.LogsResult{}, err
	}
	return p.logs.Follow(ctx, req, emit)
}

// Rollback moves a done migration's service back to its source.
func (a *Agent) Rollback(ctx context.Context, id string, emit func(ctlapi.MigrationEvent)) (ctlapi.MigrationInfo, error) {
	p, err := a.require()
	if err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	return p.mig.Rollback(ctx, id, emit)
}

// Migrations lists the migrations, oldest first.
func (a *Agent) Migrations(ctx context.Context) ([]ctlapi.MigrationInfo, error) {
	p, err := a.require()
	if err != nil {
		return nil, err
	}
	return p.mig.List(ctx)
}

// Migration describes one migration.
func (a *Agent) Migration(ctx context.Context, id string) (ctlapi.MigrationInfo, error) {
	p, err := a.require()
	if err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	return p.mig.Show(ctx, id)
}

// MigratePreview shows what a migration would do and whether it can.
func (a *Agent) MigratePreview(ctx context.Context, req ctlapi.MigrateRequest) (ctlapi.MigrationPlan, error) {
	p, err := a.require()
	if err != nil {
		return ctlapi.MigrationPlan{}, err
	}
	return p.mig.Preview(ctx, req)
}

// AbortMigration aborts a migration this daemon runs, before its commit.
func (a *Agent) AbortMigration(ctx context.Context, id string) (ctlapi.MigrationInfo, error) {
	p, err := a.require()
	if err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	return p.mig.Abort(ctx, id)
}

// PurgeSource destroys the copy a done migration kept on its source.
func (a *Agent) PurgeSource(ctx context.Context, id string) (ctlapi.MigrationInfo, error) {
	p, err := a.require()
	if err != nil {
		return ctlapi.MigrationInfo{}, err
	}
	return p.mig.PurgeSource(ctx, id)
}

// Drain starts the drain of a machine, or follows the one that runs.
func (a *Agent) Drain(ctx context.Context, req ctlapi.DrainRequest, emit func(ctlapi.DrainEvent)) (ctlapi.DrainInfo, error) {
	p, err := a.require()
	if err != nil {
		return ctlapi.DrainInfo{}, err
	}
	return p.drains.Drain(ctx, req, emit)
}

// DrainStatus gives a machine's latest drain.
func (a *Agent) DrainStatus(ctx context.Context, machine string) (ctlapi.DrainInfo, error) {
	p, err := a.require()
	if err != nil {
		return ctlapi.DrainInfo{}, err
	}
	return p.drains.Status(ctx, machine)
}

// Probe commits no-op entries through the fact store and times them.
func (a *Agent) Probe(ctx context.Context, req ctlapi.ProbeRequest) (ctlapi.ProbeResult, error) {
	p, err := a.require()
	if err != nil {
		return ctlapi.ProbeResult{}, err
	}
	out, err := probe.Run(ctx, p.node, a.machineID, a.cfg.Name, req)
	if err != nil {
		return out, err
	}
	if st, err := p.node.Status(); err == nil {
		out.Leader = a.nameOf(st.LeaderID)
	}
	return out, nil
}

// RemoveMachine removes a drained or dead machine from the cluster.
func (a *Agent) RemoveMachine(ctx context.Context, req ctlapi.RemoveMachineRequest) (ctlapi.RemovedMachine, error) {
	p, err := a.require()
	if err != nil {
		return ctlapi.RemovedMachine{}, err
	}
	return p.rm.RemoveMachine(ctx, req)
}
