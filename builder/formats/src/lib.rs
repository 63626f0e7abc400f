//! The disk and file formats kimg writes and reads: GPT, the FAT32 ESP, ext4, qcow2
//! ([`disk`]), ISO9660 with Rock Ridge ([`iso`]), the cpio initramfs ([`initramfs`])
//! and ELF inspection ([`elf`]). Each is checked by its tests against the tool people
//! trust for it (sgdisk, fsck.vfat, e2fsck, qemu-img, xorriso, cpio).

pub mod disk;
pub mod elf;
pub mod initramfs;
pub mod iso;
