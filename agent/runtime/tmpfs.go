package runtime

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// ensureTmpfs makes dir a memory-backed file system only root can enter,
// mounting one unless it already is: the secret files containers mount
// never reach a disk. A mount left from before a daemon restart is kept
// (running containers mount files in it).
func ensureTmpfs(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("making %s: %w", dir, err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("checking %s: %w", dir, err)
	}
	if st.Type == unix.TMPFS_MAGIC {
		return os.Chmod(dir, 0o700)
	}
	if err := unix.Mount("drover-secrets", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=0700,size=64m"); err != nil {
		return fmt.Errorf("mounting a tmpfs for secrets at %s: %w", dir, err)
	}
	return nil
}
