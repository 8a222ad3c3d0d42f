// Package loopback puts service IPs on this host's loopback as /32s:
// Docker publishes a service's ports there, and the mesh routes the
// address to the machine that owns the service.
package loopback

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Addresses changes the service IPs of one range on the loopback.
type Addresses struct {
	Prefix netip.Prefix // the service range; addresses outside it are never touched
}

// Add puts one service IP on the loopback; already there is fine.
func (a Addresses) Add(ip netip.Addr) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	if err := netlink.AddrAdd(lo, hostAddr(ip)); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("adding service IP %s: %w", ip, err)
	}
	return nil
}

// Remove takes one service IP off the loopback; already gone is fine.
func (a Addresses) Remove(ip netip.Addr) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	if err := netlink.AddrDel(lo, hostAddr(ip)); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
		return fmt.Errorf("removing service IP %s: %w", ip, err)
	}
	return nil
}

// Set makes the /32s of the range on the loopback exactly want.
func (a Addresses) Set(want []netip.Addr) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	addrs, err := netlink.AddrList(lo, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("loopback addresses: %w", err)
	}
	wantSet := map[netip.Addr]bool{}
	for _, ip := range want {
		wantSet[ip] = true
	}
	for _, have := range addrs {
		ip, _ := netip.AddrFromSlice(have.IP)
		ip = ip.Unmap()
		ones, _ := have.Mask.Size()
		if ones != 32 || !a.Prefix.Contains(ip) {
			continue
		}
		if wantSet[ip] {
			delete(wantSet, ip)
			continue
		}
		if err := netlink.AddrDel(lo, &have); err != nil {
			return fmt.Errorf("removing service IP %s: %w", ip, err)
		}
	}
	for ip := range wantSet {
		if err := netlink.AddrAdd(lo, hostAddr(ip)); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("adding service IP %s: %w", ip, err)
		}
	}
	return nil
}

func hostAddr(ip netip.Addr) *netlink.Addr {
	return &netlink.Addr{IPNet: &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(32, 32)}}
}
