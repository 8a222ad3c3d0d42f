package ctlapi

// Error codes of the control API: the `code` of every error answer, and
// of the error line that ends a stream. They are stable: scripts match
// them, and renaming one is a breaking change.
const (
	CodeInternal         = "internal" // any error the daemon did not classify; logged there
	CodeBadRequest       = "bad_request"
	CodeNotFound         = "not_found"
	CodeMethodNotAllowed = "method_not_allowed"
	CodeVersionMismatch  = "version_mismatch"

	CodeNotInCluster     = "not_in_cluster"
	CodeAlreadyInCluster = "already_in_cluster"
	CodeBadToken         = "bad_token"
	CodeJoinFailed       = "join_failed"
	CodeJoinRefused      = "join_refused"     // the leader did not admit this machine
	CodeRemoved          = "removed"          // this machine was removed from its cluster
	CodeRotationStalled  = "rotation_stalled" // a live machine did not confirm a key rotation step
	CodeUnknownMachine   = "unknown_machine"
	CodeUnknownService   = "unknown_service"
	CodeUnknownMigration = "unknown_migration"

	CodeBadManifest     = "bad_manifest"
	CodeBadImage        = "bad_image" // an image that cannot be pinned: unknown, registry unreachable, login refused
	CodeImagePushFailed = "image_push_failed"
	CodePullFailed      = "pull_failed" // a machine could not get a service's image
	CodeNamespaceLocked = "namespace_locked"
	CodeServiceFailed   = "service_failed"
	CodeFailoverRefused = "failover_refused"
	CodeTooLarge        = "too_large" // a command over the fact store's limit

	CodePreflightFailed  = "preflight_failed"
	CodeMigrationAborted = "migration_aborted"
	CodeNoBase           = "no_base"
	CodeCommitted        = "committed"
	CodeEnded            = "ended"
	CodeNotHere          = "not_here"
	CodeNoRollback       = "no_rollback"
	CodeNotDone          = "not_done"
	CodeMachineGone      = "machine_gone"
	CodeNoDrain          = "no_drain"
	CodeDrainIncomplete  = "drain_incomplete"
	CodeDrainCancelled   = "drain_cancelled"
	CodeSelf             = "self"
	CodeNotDrained       = "not_drained"
	CodeMachineHolds     = "machine_holds"
)
