//! kimg-init, the PID 1 of a kimg VM: one static binary for the initramfs (`/init`)
//! and the root (`/sbin/init`). Everything it does lives in the library.

fn main() {
    kimg_init::boot::main()
}
