//! The parts of H.225.0 (H323-MESSAGES, aligned PER) the proxy routes on: the message body of
//! an H323-UserInformation (a Setup's destination aliases), the RAS messages that H.460.17
//! tunnels in its `genericData`, and a GatekeeperRequest's or RegistrationRequest's gatekeeper
//! identifier and aliases.
//!
//! Each function walks one ASN.1 type of the module, component by component in the order of
//! the module; what the proxy does not need is read only as far as needed to skip it. Whatever
//! an extensible type carries beyond its root (extension additions, extension alternatives of
//! a CHOICE) is an open type with a length in front, so it is skipped without knowing its
//! type: this is what keeps the walker small and makes it accept messages of later H.225.0
//! versions. Types nest only as the module nests them, except `Content` (GenericData
//! parameters), which may nest itself: that depth is limited by [`MAX_DEPTH`].

use super::per::{PerError, Reader, Result};

/// Nesting of GenericData/EnumeratedParameter inside each other.
pub const MAX_DEPTH: u32 = 8;

/// The H.460.17 feature number, and its parameter that carries a RAS message.
pub const H460_17: u64 = 17;
const H460_17_RAS: u64 = 1;

/// An alias (AliasAddress) the proxy can read: h323-ID, url-ID or email-ID.
pub type Alias = String;

/// What an H323-UserInformation holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UserInfo {
    /// The body's CHOICE index (root alternatives 0..=6, extension ones 7 and on).
    pub body: usize,
    /// A Setup's destinationAddress aliases (readable ones only).
    pub destination: Vec<Alias>,
    /// RAS messages tunnelled per H.460.17 in the PDU's genericData.
    pub ras: Vec<Vec<u8>>,
    /// Whether the body could be walked whole, so `ras` is complete. False for the root
    /// bodies the walker does not know (call proceeding, alerting and the like), which never
    /// carry tunnelled RAS.
    pub complete: bool,
}

pub const BODY_SETUP: usize = 0;
pub const BODY_FACILITY: usize = 6;

/// The root alternatives of `h323-message-body`.
const BODY_ROOT: usize = 7;

pub fn user_information(r: &mut Reader<'_>) -> Result<UserInfo> {
    // user-data and the extension additions follow the PDU; nothing in them routes.
    let _ext = r.extended()?;
    let _user_data = r.presence(1)?;
    h323_uu_pdu(r)
}

fn h323_uu_pdu(r: &mut Reader<'_>) -> Result<UserInfo> {
    let ext = r.extended()?;
    let opt = r.presence(1)?;
    let mut info = UserInfo {
        complete: true,
        ..UserInfo::default()
    };
    match r.choice(true, BODY_ROOT)? {
        Ok(BODY_SETUP) => info.destination = setup(r)?,
        Ok(BODY_FACILITY) => {
            info.body = BODY_FACILITY;
            facility(r)?;
        }
        Ok(i) => {
            info.body = i;
            info.complete = false;
            return Ok(info);
        }
        Err(i) => {
            info.body = BODY_ROOT + i;
            r.open()?;
        }
    }
    if opt[0] {
        non_standard_parameter(r)?;
    }
    if ext {
        // genericData is the ninth addition.
        r.additions(|i, inner| {
            if i == 8 {
                let n = inner.count(None)?;
                for _ in 0..n {
                    generic_data(inner, 0, &mut info.ras)?;
                }
            }
            Ok(())
        })?;
    }
    Ok(info)
}

/// Setup-UUIE: the whole root; returns the destination aliases.
fn setup(r: &mut Reader<'_>) -> Result<Vec<Alias>> {
    let ext = r.extended()?;
    // h245Address sourceAddress destinationAddress destCallSignalAddress destExtraCallInfo
    // destExtraCRV callServices
    let opt = r.presence(7)?;
    r.oid()?;
    if opt[0] {
        transport_address(r)?;
    }
    if opt[1] {
        aliases(r)?;
    }
    endpoint_type(r)?;
    let destination = if opt[2] { aliases(r)? } else { Vec::new() };
    if opt[3] {
        transport_address(r)?;
    }
    if opt[4] {
        aliases(r)?;
    }
    if opt[5] {
        let n = r.count(None)?;
        for _ in 0..n {
            r.int(0, 65535)?;
        }
    }
    r.bit()?; // activeMC
    r.octet_string(16, Some(16))?; // conferenceID
    null_choice(r, 3)?; // conferenceGoal
    if opt[6] {
        qseries_options(r)?;
    }
    null_choice(r, 4)?; // callType
    if ext {
        r.skip_additions()?;
    }
    Ok(destination)
}

/// Facility-UUIE: the whole root.
fn facility(r: &mut Reader<'_>) -> Result<()> {
    let ext = r.extended()?;
    // alternativeAddress alternativeAliasAddress conferenceID
    let opt = r.presence(3)?;
    r.oid()?;
    if opt[0] {
        transport_address(r)?;
    }
    if opt[1] {
        aliases(r)?;
    }
    if opt[2] {
        r.octet_string(16, Some(16))?;
    }
    null_choice(r, 4)?; // reason
    if ext {
        r.skip_additions()?;
    }
    Ok(())
}

/// An extensible CHOICE of `root` NULL alternatives.
fn null_choice(r: &mut Reader<'_>, root: usize) -> Result<()> {
    if let Err(_ext) = r.choice(true, root)? {
        r.open()?;
    }
    Ok(())
}

fn qseries_options(r: &mut Reader<'_>) -> Result<()> {
    let ext = r.extended()?;
    for _ in 0..7 {
        r.bit()?;
    }
    // Q954Details
    let ext2 = r.extended()?;
    r.bit()?;
    r.bit()?;
    if ext2 {
        r.skip_additions()?;
    }
    if ext {
        r.skip_additions()?;
    }
    Ok(())
}

fn non_standard_parameter(r: &mut Reader<'_>) -> Result<()> {
    // NonStandardIdentifier
    match r.choice(true, 2)? {
        Ok(0) => r.oid()?,
        Ok(_) => h221_non_standard(r)?,
        Err(_) => {
            r.open()?;
        }
    }
    r.octet_string(0, None)?; // data
    Ok(())
}

fn h221_non_standard(r: &mut Reader<'_>) -> Result<()> {
    let ext = r.extended()?;
    r.int(0, 255)?;
    r.int(0, 255)?;
    r.int(0, 65535)?;
    if ext {
        r.skip_additions()?;
    }
    Ok(())
}

fn transport_address(r: &mut Reader<'_>) -> Result<()> {
    match r.choice(true, 7)? {
        // ipAddress
        Ok(0) => {
            r.octet_string(4, Some(4))?;
            r.int(0, 65535)?;
        }
        // ipSourceRoute
        Ok(1) => {
            let ext = r.extended()?;
            r.octet_string(4, Some(4))?;
            r.int(0, 65535)?;
            let n = r.count(None)?;
            for _ in 0..n {
                r.octet_string(4, Some(4))?;
            }
            null_choice(r, 2)?;
            if ext {
                r.skip_additions()?;
            }
        }
        // ipxAddress
        Ok(2) => {
            r.octet_string(6, Some(6))?;
            r.octet_string(4, Some(4))?;
            r.octet_string(2, Some(2))?;
        }
        // ip6Address
        Ok(3) => {
            let ext = r.extended()?;
            r.octet_string(16, Some(16))?;
            r.int(0, 65535)?;
            if ext {
                r.skip_additions()?;
            }
        }
        Ok(4) => {
            r.octet_string(16, Some(16))?;
        }
        Ok(5) => {
            r.octet_string(1, Some(20))?;
        }
        Ok(_) => non_standard_parameter(r)?,
        Err(_) => {
            r.open()?;
        }
    }
    Ok(())
}

/// SEQUENCE OF AliasAddress: the readable ones.
fn aliases(r: &mut Reader<'_>) -> Result<Vec<Alias>> {
    let n = r.count(None)?;
    let mut out = Vec::new();
    for _ in 0..n {
        if let Some(a) = alias_address(r)? {
            // A few aliases are plenty; the rest is read past, not kept.
            if out.len() < 16 {
                out.push(a);
            }
        }
    }
    Ok(out)
}

fn alias_address(r: &mut Reader<'_>) -> Result<Option<Alias>> {
    Ok(match r.choice(true, 2)? {
        // dialledDigits: IA5String (SIZE (1..128)) FROM ("0123456789#*,"): 4 bits each.
        Ok(0) => {
            r.skip_narrow_string(1, 128, 4)?;
            None
        }
        Ok(_) => Some(r.bmp_string(1, Some(256))?),
        // url-ID, email-ID: IA5String (SIZE (1..512)).
        Err(0 | 2) => {
            let mut inner = r.open()?;
            Some(inner.ia5_string(1, Some(512))?)
        }
        Err(_) => {
            r.open()?;
            None
        }
    })
}

fn endpoint_type(r: &mut Reader<'_>) -> Result<()> {
    let ext = r.extended()?;
    // nonStandardData vendor gatekeeper gateway mcu terminal
    let opt = r.presence(6)?;
    if opt[0] {
        non_standard_parameter(r)?;
    }
    if opt[1] {
        vendor_identifier(r)?;
    }
    if opt[2] {
        only_non_standard(r)?;
    }
    if opt[3] {
        gateway_info(r)?;
    }
    if opt[4] {
        only_non_standard(r)?;
    }
    if opt[5] {
        only_non_standard(r)?;
    }
    r.bit()?; // mc
    r.bit()?; // undefinedNode
    if ext {
        r.skip_additions()?;
    }
    Ok(())
}

fn vendor_identifier(r: &mut Reader<'_>) -> Result<()> {
    let ext = r.extended()?;
    let opt = r.presence(2)?;
    h221_non_standard(r)?;
    if opt[0] {
        r.octet_string(1, Some(256))?;
    }
    if opt[1] {
        r.octet_string(1, Some(256))?;
    }
    if ext {
        r.skip_additions()?;
    }
    Ok(())
}

/// GatekeeperInfo, McuInfo, TerminalInfo and the XxxCaps of SupportedProtocols: an
/// extensible SEQUENCE whose root is one optional NonStandardParameter.
fn only_non_standard(r: &mut Reader<'_>) -> Result<()> {
    let ext = r.extended()?;
    let opt = r.presence(1)?;
    if opt[0] {
        non_standard_parameter(r)?;
    }
    if ext {
        r.skip_additions()?;
    }
    Ok(())
}

fn gateway_info(r: &mut Reader<'_>) -> Result<()> {
    let ext = r.extended()?;
    let opt = r.presence(2)?;
    if opt[0] {
        let n = r.count(None)?;
        for _ in 0..n {
            // SupportedProtocols
            match r.choice(true, 9)? {
                Ok(0) => non_standard_parameter(r)?,
                Ok(_) => only_non_standard(r)?,
                Err(_) => {
                    r.open()?;
                }
            }
        }
    }
    if opt[1] {
        non_standard_parameter(r)?;
    }
    if ext {
        r.skip_additions()?;
    }
    Ok(())
}

/// GenericIdentifier: `Some(n)` for `standard n`.
fn generic_identifier(r: &mut Reader<'_>) -> Result<Option<u64>> {
    Ok(match r.choice(true, 3)? {
        Ok(0) => {
            // INTEGER (0..16383, ...)
            if r.extended()? {
                let n = r.length()?;
                if n == 0 || n > 8 {
                    return Err(PerError::Invalid("integer length"));
                }
                let raw = r.octets(n)?;
                Some(raw.iter().fold(0u64, |v, b| (v << 8) | u64::from(*b)))
            } else {
                Some(r.int(0, 16383)?)
            }
        }
        Ok(1) => {
            r.oid()?;
            None
        }
        Ok(_) => {
            r.octet_string(16, Some(16))?;
            None
        }
        Err(_) => {
            r.open()?;
            None
        }
    })
}

/// GenericData; collects the RAS messages of H.460.17 into `ras`.
fn generic_data(r: &mut Reader<'_>, depth: u32, ras: &mut Vec<Vec<u8>>) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(PerError::TooComplex);
    }
    let ext = r.extended()?;
    let opt = r.presence(1)?;
    let id = generic_identifier(r)?;
    if opt[0] {
        let n = r.count(Some((1, 512)))?;
        for _ in 0..n {
            enumerated_parameter(r, depth, id == Some(H460_17), ras)?;
        }
    }
    if ext {
        r.skip_additions()?;
    }
    Ok(())
}

fn enumerated_parameter(
    r: &mut Reader<'_>,
    depth: u32,
    in_h460_17: bool,
    ras: &mut Vec<Vec<u8>>,
) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(PerError::TooComplex);
    }
    let ext = r.extended()?;
    let opt = r.presence(1)?;
    let id = generic_identifier(r)?;
    if opt[0] {
        // Content
        match r.choice(true, 12)? {
            Ok(0) => {
                let raw = r.octet_string(0, None)?;
                if in_h460_17 && id == Some(H460_17_RAS) && ras.len() < 4 {
                    ras.push(raw.to_vec());
                }
            }
            Ok(1) => {
                r.ia5_string(0, None)?;
            }
            Ok(2) => {
                r.bmp_string(0, None)?;
            }
            Ok(3) => {
                r.bit()?;
            }
            Ok(4) => {
                r.int(0, 255)?;
            }
            Ok(5) => {
                r.int(0, 65535)?;
            }
            Ok(6) => {
                r.int(0, 4_294_967_295)?;
            }
            Ok(7) => {
                generic_identifier(r)?;
            }
            Ok(8) => {
                alias_address(r)?;
            }
            Ok(9) => transport_address(r)?,
            Ok(10) => {
                let n = r.count(Some((1, 512)))?;
                for _ in 0..n {
                    enumerated_parameter(r, depth + 1, false, ras)?;
                }
            }
            Ok(_) => {
                let n = r.count(Some((1, 16)))?;
                for _ in 0..n {
                    generic_data(r, depth + 1, ras)?;
                }
            }
            Err(_) => {
                r.open()?;
            }
        }
    }
    if ext {
        r.skip_additions()?;
    }
    Ok(())
}

/// A RAS message, as far as the proxy cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ras {
    /// GatekeeperRequest: its gatekeeper identifier and endpoint aliases.
    Grq {
        gkid: Option<String>,
        aliases: Vec<Alias>,
    },
    /// RegistrationRequest: its gatekeeper identifier and terminal aliases.
    Rrq {
        gkid: Option<String>,
        aliases: Vec<Alias>,
    },
    GatekeeperReject,
    RegistrationReject,
    /// Any other RAS message (by its CHOICE index; extension ones from 25 on).
    Other(usize),
}

const RAS_ROOT: usize = 25;

pub fn ras_message(r: &mut Reader<'_>) -> Result<Ras> {
    Ok(match r.choice(true, RAS_ROOT)? {
        Ok(0) => gatekeeper_request(r)?,
        Ok(2) => Ras::GatekeeperReject,
        Ok(3) => registration_request(r)?,
        Ok(5) => Ras::RegistrationReject,
        Ok(i) => Ras::Other(i),
        Err(i) => Ras::Other(RAS_ROOT + i),
    })
}

fn gatekeeper_request(r: &mut Reader<'_>) -> Result<Ras> {
    let _ext = r.extended()?;
    // nonStandardData gatekeeperIdentifier callServices endpointAlias
    let opt = r.presence(4)?;
    r.int(1, 65535)?; // requestSeqNum
    r.oid()?;
    if opt[0] {
        non_standard_parameter(r)?;
    }
    transport_address(r)?; // rasAddress
    endpoint_type(r)?;
    let gkid = if opt[1] {
        Some(r.bmp_string(1, Some(128))?)
    } else {
        None
    };
    if opt[2] {
        qseries_options(r)?;
    }
    let aliases = if opt[3] { aliases(r)? } else { Vec::new() };
    // What follows does not route.
    Ok(Ras::Grq { gkid, aliases })
}

fn registration_request(r: &mut Reader<'_>) -> Result<Ras> {
    let _ext = r.extended()?;
    // nonStandardData terminalAlias gatekeeperIdentifier
    let opt = r.presence(3)?;
    r.int(1, 65535)?; // requestSeqNum
    r.oid()?;
    if opt[0] {
        non_standard_parameter(r)?;
    }
    r.bit()?; // discoveryComplete
    for _ in 0..2 {
        // callSignalAddress, rasAddress
        let n = r.count(None)?;
        for _ in 0..n {
            transport_address(r)?;
        }
    }
    endpoint_type(r)?; // terminalType
    let aliases = if opt[1] { aliases(r)? } else { Vec::new() };
    let gkid = if opt[2] {
        Some(r.bmp_string(1, Some(128))?)
    } else {
        None
    };
    Ok(Ras::Rrq { gkid, aliases })
}
