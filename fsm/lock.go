package fsm

import "time"

// MaxLease is the longest lease a namespace lock may be granted at once.
const MaxLease = time.Hour

// Lock is a namespace lock: at most one holder at a time, until ExpiresAt
// unless renewed.
type Lock struct {
	Namespace  string    `json:"namespace"`
	Holder     string    `json:"holder"`
	AcquiredAt time.Time `json:"acquired_at"`
	ExpiresAt  time.Time `json:"expires_at"`
}

// AcquireLock takes a namespace's lock for Holder for Lease from At. The
// same holder extends it. Result: Lock.
type AcquireLock struct {
	Namespace string        `json:"namespace"`
	Holder    string        `json:"holder"`
	Lease     time.Duration `json:"lease"`
	At        time.Time     `json:"at"`
}

// RenewLock extends a lock its holder still holds. Result: Lock.
type RenewLock struct {
	Namespace string        `json:"namespace"`
	Holder    string        `json:"holder"`
	Lease     time.Duration `json:"lease"`
	At        time.Time     `json:"at"`
}

// ReleaseLock gives a lock up; releasing a free lock is a no-op. Result: nil.
type ReleaseLock struct {
	Namespace string    `json:"namespace"`
	Holder    string    `json:"holder"`
	At        time.Time `json:"at"`
}

// ExpireLocks removes every lock whose lease ended by At. Result: []Lock.
type ExpireLocks struct {
	At time.Time `json:"at"`
}

// Type implements Command.
func (AcquireLock) Type() CommandType { return CmdAcquireLock }

// Type implements Command.
func (RenewLock) Type() CommandType { return CmdRenewLock }

// Type implements Command.
func (ReleaseLock) Type() CommandType { return CmdReleaseLock }

// Type implements Command.
func (ExpireLocks) Type() CommandType { return CmdExpireLocks }

func checkLockRequest(ns, holder string, lease time.Duration) *RuleError {
	if !ValidName(ns) {
		return ruleErr(ErrInvalid, "namespace %q is not a DNS label", ns)
	}
	if holder == "" {
		return ruleErr(ErrInvalid, "lock on namespace %q: no holder given", ns)
	}
	if lease <= 0 || lease > MaxLease {
		return ruleErr(ErrInvalid, "lock on namespace %q: lease %v is not in (0, %v]", ns, lease, MaxLease)
	}
	return nil
}

func lockHeld(l Lock) *RuleError {
	e := ruleErr(ErrLockHeld, "namespace %q is locked by %q since %s (lease ends %s)",
		l.Namespace, l.Holder, l.AcquiredAt.UTC().Format(time.RFC3339), l.ExpiresAt.UTC().Format(time.RFC3339))
	e.Holder, e.Since = l.Holder, l.AcquiredAt
	return e
}

func (s *State) acquireLock(c AcquireLock) (any, *RuleError) {
	if err := checkLockRequest(c.Namespace, c.Holder, c.Lease); err != nil {
		return nil, err
	}
	l, held := s.locks[c.Namespace]
	switch {
	case held && l.Holder != c.Holder && c.At.Before(l.ExpiresAt):
		return nil, lockHeld(l)
	case held && l.Holder == c.Holder && c.At.Before(l.ExpiresAt):
		l.ExpiresAt = c.At.Add(c.Lease)
	default:
		l = Lock{Namespace: c.Namespace, Holder: c.Holder, AcquiredAt: c.At, ExpiresAt: c.At.Add(c.Lease)}
	}
	s.locks[c.Namespace] = l
	return l, nil
}

func (s *State) renewLock(c RenewLock) (any, *RuleError) {
	if err := checkLockRequest(c.Namespace, c.Holder, c.Lease); err != nil {
		return nil, err
	}
	l, held := s.locks[c.Namespace]
	if !held || !c.At.Before(l.ExpiresAt) {
		return nil, ruleErr(ErrLockNotHeld, "namespace %q is not locked by %q (the lock is free or expired)", c.Namespace, c.Holder)
	}
	if l.Holder != c.Holder {
		e := ruleErr(ErrLockNotHeld, "namespace %q is locked by %q, not by %q", c.Namespace, l.Holder, c.Holder)
		e.Holder, e.Since = l.Holder, l.AcquiredAt
		return nil, e
	}
	l.ExpiresAt = c.At.Add(c.Lease)
	s.locks[c.Namespace] = l
	return l, nil
}

func (s *State) releaseLock(c ReleaseLock) (any, *RuleError) {
	l, held := s.locks[c.Namespace]
	if !held {
		return nil, nil
	}
	if l.Holder != c.Holder {
		e := ruleErr(ErrLockNotHeld, "namespace %q is locked by %q, not by %q", c.Namespace, l.Holder, c.Holder)
		e.Holder, e.Since = l.Holder, l.AcquiredAt
		return nil, e
	}
	delete(s.locks, c.Namespace)
	return nil, nil
}

func (s *State) expireLocks(c ExpireLocks) (any, *RuleError) {
	expired := []Lock{}
	for _, l := range s.Locks() {
		if !l.ExpiresAt.After(c.At) {
			expired = append(expired, l)
			delete(s.locks, l.Namespace)
		}
	}
	return expired, nil
}

// Locks lists the held locks, sorted by namespace.
func (s *State) Locks() []Lock {
	return sortedValues(s.locks, func(l Lock) string { return l.Namespace })
}

// Lock looks a namespace's lock up.
func (s *State) Lock(namespace string) (Lock, bool) {
	l, ok := s.locks[namespace]
	return l, ok
}
