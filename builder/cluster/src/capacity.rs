//! What this host can hold and boot at once: the memory each VM's QEMU takes,
//! checked against `MemAvailable` before anything starts; the window of VMs booting
//! together, sized to the host's cores and free memory; and a bounded pool of
//! threads for per-VM calls (status, poweroff) of big clusters.

use crate::error::ClusterError;
use crate::state::VmRecord;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Guest RAM an idle VM's QEMU holds at most, MiB, whatever `--mem` says beyond it:
/// what the kernel, kimg-init and the page cache keep once the balloon reported
/// the rest back. Measured (TCG, base image, ready then idle 30 s, the guest RAM
/// mapping's Rss in smaps): 76-82 MiB at --mem 112, 128 and 384, q35 and microvm.
pub const GUEST_IDLE_MIB: u64 = 84;
/// Guest RAM a VM's QEMU holds at most while the VM boots (the kernel's
/// decompression, the initramfs and stage 1, before they are reported back).
/// Measured at ready: 100 MiB of a 112 MiB guest, 117 of 128, 117-124 of 384.
pub const GUEST_BOOT_MIB: u64 = 128;
/// QEMU's own anonymous memory per VM besides guest RAM (the TCG code buffer, its
/// copies of kernel and initramfs, heap, devices), measured 49-51 MiB with the
/// small code buffer of base VMs; VMs that are not lean ([`crate::qemu::lean`]:
/// Kubernetes, over 512 MiB, several vCPUs) hold more, uncounted
/// here. Its binary and libraries (~15 MB) are shared by all QEMUs and not counted.
pub const QEMU_OWN_MIB: u64 = 52;
/// VMs booting at once per host core: under TCG a boot is CPU-bound, a few per core
/// keep the cores busy through a VM's waits without starving any guest's timers.
pub const BOOTS_PER_CORE: usize = 4;
/// Threads for per-VM calls to a big cluster (status, poweroff).
pub const CALL_THREADS: usize = 16;

/// Host memory an idle VM of `mem_mb` holds, MiB.
pub fn idle_mib(mem_mb: u32) -> u64 {
    u64::from(mem_mb).min(GUEST_IDLE_MIB) + QEMU_OWN_MIB
}

/// Host memory a VM of `mem_mb` holds at most while it boots, MiB.
pub fn boot_mib(mem_mb: u32) -> u64 {
    u64::from(mem_mb).min(GUEST_BOOT_MIB) + QEMU_OWN_MIB
}

/// Host memory `vms` need, MiB, when `window` of them boot at once: every VM idle,
/// plus the boot's extra for the `window` with the most of it.
pub fn need_mib(vms: &[VmRecord], window: usize) -> u64 {
    let idle: u64 = vms.iter().map(|r| idle_mib(r.mem_mb)).sum();
    let mut extra: Vec<u64> = vms
        .iter()
        .map(|r| boot_mib(r.mem_mb) - idle_mib(r.mem_mb))
        .collect();
    extra.sort_unstable_by(|a, b| b.cmp(a));
    idle + extra.iter().take(window).sum::<u64>()
}

/// `MemAvailable` of /proc/meminfo in MiB.
pub fn mem_available_mib() -> Option<u64> {
    crate::process::proc_kib("/proc/meminfo", "MemAvailable").map(|kib| kib / 1024)
}

/// Refuses `vms` when the host's available memory cannot hold them.
pub fn check_memory(vms: &[VmRecord]) -> Result<(), ClusterError> {
    let Some(available_mib) = mem_available_mib() else {
        return Ok(()); // no /proc/meminfo: nothing to judge by
    };
    check_memory_against(vms, available_mib)
}

fn check_memory_against(vms: &[VmRecord], available_mib: u64) -> Result<(), ClusterError> {
    let window = boot_window_for(vms, available_mib);
    let need_mib = need_mib(vms, window);
    if need_mib > available_mib {
        return Err(ClusterError::HostMemory {
            vms: vms.len(),
            window,
            need_mib,
            available_mib,
        });
    }
    Ok(())
}

/// How many of `vms` boot at once: [`BOOTS_PER_CORE`] per core, fewer when free
/// memory holds fewer booting VMs, at least one.
pub fn boot_window(vms: &[VmRecord]) -> usize {
    boot_window_for(vms, mem_available_mib().unwrap_or(u64::MAX))
}

fn boot_window_for(vms: &[VmRecord], available_mib: u64) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_vm = vms.iter().map(|r| boot_mib(r.mem_mb)).max().unwrap_or(1);
    let by_memory = usize::try_from(available_mib / per_vm.max(1)).unwrap_or(usize::MAX);
    (cores * BOOTS_PER_CORE).min(by_memory).max(1)
}

/// `f` over `items` on at most `threads` threads, results in the items' order.
pub fn par_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let out: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, items.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                if let Ok(mut slot) = out[i].lock() {
                    *slot = Some(r);
                }
            });
        }
    });
    out.into_iter()
        .filter_map(|m| m.into_inner().ok().flatten())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kimg_contract::VmId;

    fn recs(n: u16, mem_mb: u32) -> Vec<VmRecord> {
        (1..=n)
            .map(|i| VmRecord {
                vm: VmId::new(i).unwrap(),
                mem_mb,
                cpus: 1,
            })
            .collect()
    }

    #[test]
    fn a_cluster_bigger_than_free_memory_is_refused_with_the_numbers() {
        let vms = recs(100, 128);
        let window = boot_window_for(&vms, u64::MAX);
        let need = need_mib(&vms, window);
        let extra = boot_mib(128) - idle_mib(128);
        assert_eq!(need, 100 * idle_mib(128) + window as u64 * extra);
        let e = check_memory_against(&vms, need - 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("100 VMs")
                && e.contains(&format!("{need} MiB"))
                && e.contains(&format!("is {} MiB", need - 1)),
            "{e}"
        );
        check_memory_against(&vms, need).unwrap();
        // --mem beyond what a VM touches costs nothing more.
        assert_eq!(idle_mib(4096), GUEST_IDLE_MIB + QEMU_OWN_MIB);
        assert_eq!(boot_mib(4096), GUEST_BOOT_MIB + QEMU_OWN_MIB);
    }

    #[test]
    fn windows_are_bounded_and_par_map_keeps_order() {
        let w = boot_window(&recs(100, 96));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(w >= 1 && w <= cores * BOOTS_PER_CORE, "{w}");
        let items: Vec<u32> = (0..100).collect();
        let peak = AtomicUsize::new(0);
        let now = AtomicUsize::new(0);
        let out = par_map(&items, 7, |x| {
            let n = now.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(n, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(2));
            now.fetch_sub(1, Ordering::SeqCst);
            x * 2
        });
        assert_eq!(out, items.iter().map(|x| x * 2).collect::<Vec<_>>());
        assert!(peak.load(Ordering::SeqCst) <= 7);
        assert!(par_map(&[] as &[u32], 4, |x| *x).is_empty());
    }
}
