//! The POSIX shared-memory object and its mapping: `shm_open`, `ftruncate`, `fstat`, `mmap`
//! and `munmap`. Together with [`super::futex`] this is the only `unsafe` code of the segment;
//! every other module of `shm` denies it.
//!
//! # Safety
//!
//! The invariants that make handing out `&Segment` sound:
//!
//! 1. The mapping is `MAP_SHARED`, page aligned, and at least `size_of::<Segment>()` bytes
//!    long: the object's size is checked with `fstat` (or set with `ftruncate` by its
//!    creator) before a mapping is made, here in [`ShmObject::map`]. So `&Segment` points at
//!    valid, suitably aligned memory for as long as the [`Mapping`] lives; the reference
//!    handed out borrows from it and `Drop` unmaps. The header alone is read the same way
//!    ([`ShmObject::peek_header`]), through a mapping of its own size.
//! 2. Every field of [`Segment`] (declared in the sibling modules) is an atomic integer or an
//!    array of them, or padding that nothing reads or writes. Any bit pattern, including the
//!    zeroes of a fresh object, is a valid value, and concurrent access from other processes
//!    is only ever through atomic operations, so there is no data race in the Rust sense even
//!    though another process writes the same memory. A field of any other type added to the
//!    segment breaks this invariant.
//! 3. A creator fills the header and only then publishes `magic` and `layout_version` with
//!    `Release`; an attacher reads them with `Acquire` before it trusts anything else (see
//!    `SharedMemory::create` and `SharedMemory::attach`).

use std::ffi::CString;
use std::mem::size_of;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::mman::{mmap, munmap, shm_open, shm_unlink, MapFlags, ProtFlags};
use nix::sys::stat::{fstat, Mode};

use super::{Header, Segment, ShmError};

/// An open shared-memory object and its size, not yet mapped.
pub(super) struct ShmObject {
    fd: OwnedFd,
    size: usize,
    name: String,
}

impl ShmObject {
    /// Creates a fresh object of `size` bytes (zero filled), replacing any object of that
    /// name.
    pub(super) fn create(name: &str, size: usize) -> Result<ShmObject, ShmError> {
        let cname = c_name(name)?;
        let _ = shm_unlink(cname.as_c_str());
        let fd = shm_open(
            cname.as_c_str(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|errno| os("shm_open", name, errno))?;
        let len = i64::try_from(size).map_err(|_| os("ftruncate", name, Errno::EINVAL))?;
        nix::unistd::ftruncate(&fd, len).map_err(|errno| os("ftruncate", name, errno))?;
        Ok(ShmObject {
            fd,
            size,
            name: name.into(),
        })
    }

    /// Opens an existing object and reads its size.
    pub(super) fn open(name: &str) -> Result<ShmObject, ShmError> {
        let cname = c_name(name)?;
        let fd = shm_open(cname.as_c_str(), OFlag::O_RDWR, Mode::empty())
            .map_err(|errno| os("shm_open", name, errno))?;
        let size = fstat(fd.as_raw_fd())
            .map_err(|errno| os("fstat", name, errno))?
            .st_size;
        Ok(ShmObject {
            fd,
            // A negative size cannot happen for a shared-memory object; read it as empty.
            size: usize::try_from(size).unwrap_or(0),
            name: name.into(),
        })
    }

    /// The object's `magic` and `layout_version`, read through a mapping of the header's
    /// size before anything else is trusted. [`ShmError::NotPortico`] when the object is too
    /// small to hold a header.
    pub(super) fn peek_header(&self) -> Result<(u64, u32), ShmError> {
        if self.size < size_of::<Header>() {
            return Err(ShmError::NotPortico {
                name: self.name.clone(),
            });
        }
        let len = size_of::<Header>();
        let header_map = map_raw(&self.fd, len, &self.name)?;
        // SAFETY: the object is at least size_of::<Header>() bytes (checked above) and the
        // mapping of that length is page aligned, and Header is all atomics (invariants 1 and
        // 2), so the reference is valid until the munmap below.
        let header = unsafe { header_map.cast::<Header>().as_ref() };
        let magic = header.magic.load(Ordering::Acquire);
        let version = header.layout_version.load(Ordering::Acquire);
        // SAFETY: unmapping the mapping made just above, with its length; `header` is not
        // used after this.
        let _ = unsafe { munmap(header_map, len) };
        Ok((magic, version))
    }

    /// Maps the whole segment. [`ShmError::TooSmall`] when the object cannot hold it.
    pub(super) fn map(self) -> Result<Mapping, ShmError> {
        let len = size_of::<Segment>();
        if self.size < len {
            return Err(ShmError::TooSmall {
                name: self.name,
                size: self.size,
            });
        }
        let ptr = map_raw(&self.fd, len, &self.name)?;
        // The descriptor can close (when `self` drops): the mapping keeps the object alive.
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }
}

/// A mapping of the whole segment; unmapped on drop (the object itself stays until
/// unlinked).
pub(super) struct Mapping {
    ptr: NonNull<Segment>,
    len: usize,
}

// SAFETY: the mapping is only accessed through `&Segment`, whose fields are all atomics
// (invariant 2), so moving the owner to another thread is sound.
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`: shared access from several threads is atomic operations only
// (invariant 2).
unsafe impl Sync for Mapping {}

impl Mapping {
    pub(super) fn segment(&self) -> &Segment {
        // SAFETY: invariants 1 and 2: the mapping is live while `self` is, is large enough and
        // aligned, and every field is an atomic.
        unsafe { self.ptr.as_ref() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe the mapping made in `ShmObject::map`; no reference
        // derived from it outlives `self` because `segment()` borrows `self`.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

/// Removes an object's name; mappings stay valid until dropped.
pub(super) fn unlink(name: &str) {
    if let Ok(c) = CString::new(name) {
        let _ = shm_unlink(c.as_c_str());
    }
}

fn c_name(name: &str) -> Result<CString, ShmError> {
    if !name.starts_with('/') || name[1..].contains('/') || name.len() > 250 {
        return Err(os("shm_open", name, Errno::EINVAL));
    }
    CString::new(name).map_err(|_| os("shm_open", name, Errno::EINVAL))
}

fn os(what: &'static str, name: &str, errno: Errno) -> ShmError {
    ShmError::Os {
        what,
        name: name.into(),
        errno,
    }
}

fn map_raw(fd: &OwnedFd, len: usize, name: &str) -> Result<NonNull<libc::c_void>, ShmError> {
    let nz = NonZeroUsize::new(len).ok_or_else(|| os("mmap", name, Errno::EINVAL))?;
    // SAFETY: a fresh shared mapping of a file descriptor we own; no existing memory is
    // affected. The result is page aligned.
    unsafe {
        mmap(
            None,
            nz,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            fd,
            0,
        )
    }
    .map_err(|errno| os("mmap", name, errno))
}
