//! The shared-memory segment between `portico` (control plane) and `portico-dataplane`.
//!
//! One POSIX shared-memory object (`/dev/shm/portico-<hash of the state dir>`) holds one
//! [`Segment`]:
//!
//! * a [`Header`] with a magic number and a layout version, so a process built from another
//!   layout refuses to attach with a clear error instead of misreading memory (this module);
//! * a [`ConfigBlock`]: the running configuration under a sequence lock (`config`);
//! * one [`WorkerCounters`] block per dataplane thread (`counters`);
//! * the kill slots and the [`AllocRecord`]s of TURN allocations (`records`);
//! * the double-buffered [`Blacklist`] (`blacklist`);
//! * one [`EventRing`] of suspicious events per counter block and their doorbell (`events`);
//! * the media relay session records, request and published session in one ([`MediaRecord`],
//!   `media`), and the counter that tells workers a request or delete is waiting.
//!
//! The object is named after the state dir so a restarted control plane finds the segment of
//! a dataplane that outlived it.
//!
//! # Safety
//!
//! All `unsafe` code of the segment is in two small modules: `mapping` (`mmap`/`munmap` of
//! the object; its module documentation states the invariants that make `&Segment` sound)
//! and `futex` (the doorbell's `FUTEX_WAIT`/`FUTEX_WAKE`). Every other module denies
//! `unsafe_code`. A field added to [`Segment`] or to one of its parts must be an atomic
//! integer or an array of them, and changes the layout: bump [`LAYOUT_VERSION`].

#![deny(unsafe_code)]

use std::fmt;
use std::mem::size_of;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use nix::errno::Errno;

mod blacklist;
mod config;
mod counters;
mod events;
// The only two modules allowed `unsafe` (each block with its `// SAFETY:` comment).
#[allow(unsafe_code)]
mod futex;
#[allow(unsafe_code)]
mod mapping;
mod media;
mod records;

pub use blacklist::{Blacklist, BlacklistTable, BLACKLIST_V6_PREFIXES};
pub use config::{ConfigBlock, ConfigWriteError};
pub use counters::WorkerCounters;
pub use events::{Event, EventKind, EventRing};
pub use media::{
    LegCounters, LegInfo, MediaFailure, MediaInfo, MediaRecord, MediaRequest, SrtpMaster,
    ACTIVE as MEDIA_ACTIVE, DELETING as MEDIA_DELETING, FAILED as MEDIA_FAILED,
    REQUESTED as MEDIA_REQUESTED, TAKEN as MEDIA_TAKEN,
};
pub use records::{AllocInfo, AllocRecord};

use mapping::{Mapping, ShmObject};

/// "PORTICO" and a format byte, as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"PORTICO\x01");
/// Bump on every change to the layout of [`Segment`].
pub const LAYOUT_VERSION: u32 = 8;
pub const MAX_WORKERS: usize = 64;
/// Counter blocks: one per worker plus one for the TCP thread, which also writes counters.
pub const COUNTER_BLOCKS: usize = MAX_WORKERS + 1;
pub const CONFIG_CAPACITY: usize = 256 * 1024;
/// TURN allocations visible to the control plane (API listing); the dataplane splits them
/// evenly between its workers. Untouched records cost no memory (tmpfs pages on demand).
pub const ALLOC_RECORDS: usize = 16 * 1024;
/// Pending "delete allocation" requests from the control plane.
pub const KILL_SLOTS: usize = 64;
/// Blacklist hash table size (a power of two); the control plane keeps it at most half full.
pub const BLACKLIST_SLOTS: usize = 1 << 16;
/// Suspicious-event ring per counter block (worker or TCP thread).
pub const EVENT_SLOTS: usize = 4096;
/// Media relay session records: the most `media.max_sessions` may be.
pub const MEDIA_RECORDS: usize = 8192;

/// Which packet driver the dataplane runs, as published in [`Header::driver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    Unknown = 0,
    IoUring = 1,
    Epoll = 2,
}

impl Driver {
    pub fn from_u32(v: u32) -> Driver {
        match v {
            1 => Driver::IoUring,
            2 => Driver::Epoll,
            _ => Driver::Unknown,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Driver::Unknown => "unknown",
            Driver::IoUring => "io_uring",
            Driver::Epoll => "epoll",
        }
    }
}

#[repr(C, align(64))]
pub struct Header {
    pub magic: AtomicU64,
    pub layout_version: AtomicU32,
    /// Workers the running dataplane started (its counter blocks `0..workers` are live).
    pub workers: AtomicU32,
    pub controlplane_pid: AtomicU32,
    pub dataplane_pid: AtomicU32,
    /// A [`Driver`] value.
    pub driver: AtomicU32,
    /// A futex word: the control plane's event reader sets it to 0 and sleeps on it; a worker
    /// that pushes an event sets it to 1 and, when it was 0, wakes the reader (one system
    /// call per wake-up, not per event). See [`Segment::ring_events_doorbell`].
    pub events_doorbell: AtomicU32,
    /// Unix time in milliseconds, refreshed by the dataplane every 100 ms while it runs.
    pub dataplane_heartbeat_ms: AtomicU64,
    pub dataplane_started_ms: AtomicU64,
    /// The configuration generation every worker has applied.
    pub config_applied: AtomicU64,
    /// Dataplane restarts by supervisors of this segment: kept here so the count survives a
    /// control-plane restart.
    pub dataplane_restarts: AtomicU64,
}

#[repr(C)]
pub struct Segment {
    pub header: Header,
    pub config: ConfigBlock,
    counters: [WorkerCounters; COUNTER_BLOCKS],
    kill: [AtomicU64; KILL_SLOTS],
    records: [AllocRecord; ALLOC_RECORDS],
    pub blacklist: Blacklist,
    events: [EventRing; COUNTER_BLOCKS],
    media_pending: MediaPending,
    media: [MediaRecord; MEDIA_RECORDS],
}

/// [`Segment::media_pending`]'s counter, on a cache line of its own.
#[repr(C, align(64))]
struct MediaPending(AtomicU64);

impl std::ops::Deref for MediaPending {
    type Target = AtomicU64;
    fn deref(&self) -> &AtomicU64 {
        &self.0
    }
}

#[derive(Debug)]
pub enum ShmError {
    Os {
        what: &'static str,
        name: String,
        errno: Errno,
    },
    NotPortico {
        name: String,
    },
    Version {
        name: String,
        found: u32,
    },
    TooSmall {
        name: String,
        size: usize,
    },
}

impl fmt::Display for ShmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShmError::Os { what, name, errno } => {
                write!(f, "shared memory {name}: {what} failed: {}", errno.desc())
            }
            ShmError::NotPortico { name } => {
                write!(f, "shared memory {name} is not a Portico segment")
            }
            ShmError::Version { name, found } => write!(
                f,
                "shared memory {name} has layout version {found}, this build speaks version \
                 {LAYOUT_VERSION}: stop the other Portico processes (or remove /dev/shm{name}) \
                 and start both from the same build"
            ),
            ShmError::TooSmall { name, size } => write!(
                f,
                "shared memory {name} is {size} bytes, smaller than the {} this layout needs",
                size_of::<Segment>()
            ),
        }
    }
}

impl std::error::Error for ShmError {}

/// A mapping of the segment; unmapped on drop (the object itself stays until unlinked).
pub struct SharedMemory {
    map: Mapping,
    name: String,
}

impl SharedMemory {
    /// The object name for a state dir: stable across restarts, distinct per installation.
    pub fn name_for_state_dir(state_dir: &Path) -> String {
        let canon = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
        // FNV-1a: a stable hash (std's is randomly seeded per process).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in canon.as_os_str().as_encoded_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("/portico-{h:016x}")
    }

    /// Creates a fresh segment, replacing any object of that name.
    pub fn create(name: &str) -> Result<SharedMemory, ShmError> {
        let map = ShmObject::create(name, size_of::<Segment>())?.map()?;
        let shm = SharedMemory {
            map,
            name: name.into(),
        };
        let h = &shm.segment().header;
        h.controlplane_pid
            .store(std::process::id(), Ordering::Relaxed);
        h.layout_version.store(LAYOUT_VERSION, Ordering::Release);
        h.magic.store(MAGIC, Ordering::Release);
        Ok(shm)
    }

    /// Attaches to an existing segment, refusing one of another layout.
    pub fn attach(name: &str) -> Result<SharedMemory, ShmError> {
        let object = ShmObject::open(name)?;
        // Read the header through a mapping of its own size before trusting the rest.
        let (magic, version) = object.peek_header()?;
        if magic != MAGIC {
            return Err(ShmError::NotPortico { name: name.into() });
        }
        if version != LAYOUT_VERSION {
            return Err(ShmError::Version {
                name: name.into(),
                found: version,
            });
        }
        Ok(SharedMemory {
            map: object.map()?,
            name: name.into(),
        })
    }

    /// Removes the object's name; mappings stay valid until dropped.
    pub fn unlink(name: &str) {
        mapping::unlink(name);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn segment(&self) -> &Segment {
        self.map.segment()
    }
}

/// A shared-memory object name unique to this test process and `tag`.
#[cfg(test)]
fn test_name(tag: &str) -> String {
    format!("/portico-test-{tag}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;

    use nix::fcntl::OFlag;
    use nix::sys::mman::shm_open;
    use nix::sys::stat::Mode;

    use super::*;

    #[test]
    fn another_layout_version_is_refused_with_a_clear_error() {
        let name = test_name("ver");
        let a = SharedMemory::create(&name).unwrap();
        a.segment()
            .header
            .layout_version
            .store(LAYOUT_VERSION + 1, Ordering::Release);
        let e = SharedMemory::attach(&name).err().unwrap();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("layout version {}", LAYOUT_VERSION + 1)),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("this build speaks version {LAYOUT_VERSION}")),
            "{msg}"
        );
        SharedMemory::unlink(&name);
        assert!(SharedMemory::attach(&name).is_err());
    }

    #[test]
    fn a_foreign_object_is_not_attached() {
        let name = test_name("foreign");
        let c = CString::new(name.clone()).unwrap();
        let fd = shm_open(
            c.as_c_str(),
            OFlag::O_CREAT | OFlag::O_RDWR,
            Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        nix::unistd::ftruncate(&fd, 4096).unwrap();
        let e = SharedMemory::attach(&name).err().unwrap();
        assert!(matches!(e, ShmError::NotPortico { .. }), "{e}");
        SharedMemory::unlink(&name);
    }

    #[test]
    fn a_short_object_is_refused_before_it_is_mapped_whole() {
        // Shorter than a header: not read at all.
        let name = test_name("short");
        let path = format!("/dev/shm{name}");
        std::fs::write(&path, [0u8; 16]).unwrap();
        let e = SharedMemory::attach(&name).err().unwrap();
        assert!(matches!(e, ShmError::NotPortico { .. }), "{e}");
        // A right header on an object too small for the segment: named, with both sizes.
        let mut bytes = vec![0u8; 4096];
        bytes[..8].copy_from_slice(&MAGIC.to_le_bytes());
        bytes[8..12].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let e = SharedMemory::attach(&name).err().unwrap();
        assert!(matches!(e, ShmError::TooSmall { size: 4096, .. }), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("smaller than the {}", size_of::<Segment>())),
            "{e}"
        );
        SharedMemory::unlink(&name);
    }

    /// The byte layout both processes rely on, pinned for this [`LAYOUT_VERSION`]: a change
    /// to any part of the segment fails here until the version is bumped with it.
    #[test]
    fn the_layout_is_pinned_to_its_version() {
        use std::mem::{align_of, offset_of};
        assert_eq!(
            LAYOUT_VERSION, 8,
            "update the figures below with the version"
        );
        let header = [
            offset_of!(Header, magic),
            offset_of!(Header, layout_version),
            offset_of!(Header, workers),
            offset_of!(Header, controlplane_pid),
            offset_of!(Header, dataplane_pid),
            offset_of!(Header, driver),
            offset_of!(Header, events_doorbell),
            offset_of!(Header, dataplane_heartbeat_ms),
            offset_of!(Header, dataplane_started_ms),
            offset_of!(Header, config_applied),
            offset_of!(Header, dataplane_restarts),
            size_of::<Header>(),
        ];
        assert_eq!(header, [0, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64]);
        let segment = [
            offset_of!(Segment, header),
            offset_of!(Segment, config),
            offset_of!(Segment, counters),
            offset_of!(Segment, kill),
            offset_of!(Segment, records),
            offset_of!(Segment, blacklist),
            offset_of!(Segment, events),
            offset_of!(Segment, media_pending),
            offset_of!(Segment, media),
            size_of::<Segment>(),
        ];
        assert_eq!(
            segment,
            [
                0, 64, 262_272, 328_832, 329_344, 3_475_072, 7_669_568, 14_071_808, 14_071_872,
                17_217_600
            ]
        );
        let parts = [
            size_of::<ConfigBlock>(),
            size_of::<WorkerCounters>(),
            size_of::<AllocRecord>(),
            size_of::<BlacklistTable>(),
            size_of::<Blacklist>(),
            size_of::<EventRing>(),
            size_of::<MediaRecord>(),
        ];
        assert_eq!(
            parts,
            [262_208, 1024, 192, 2_097_216, 4_194_496, 98_496, 384]
        );
        assert_eq!(align_of::<Segment>(), 64);
    }
}
