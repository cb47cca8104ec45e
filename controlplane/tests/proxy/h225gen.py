#!/usr/bin/env python3
"""H.225.0 test messages from an encoder that is not Portico's: pycrate's H323-MESSAGES
module (ITU-T H.225.0 ASN.1, aligned PER). Prints one TPKT packet per line, in hex.

  grq GKID [ALIAS...]          GatekeeperRequest tunnelled per H.460.17 in a FACILITY
  rrq GKID|- [ALIAS...]        RegistrationRequest likewise ("-": no gatekeeperIdentifier)
  grj | rrj                    GatekeeperReject / RegistrationReject likewise
  rcf                          RegistrationConfirm likewise (for alice, the gatekeeper
                               example.com/branch)
  setup DEST [DEST...]         Setup with destinationAddress (h323-ID, or email-ID if
                               prefixed "email:", url-ID if prefixed "url:")
  release                      ReleaseComplete
  facility-body GKID           GRQ tunnelled in a FACILITY whose body is facility (not empty)
  nested DEPTH                 FACILITY whose genericData nests DEPTH levels deep
  manyparams N                 FACILITY with one genericData of N (<= 512) parameters
  manyaliases N                RRQ for example.com with N dialledDigits aliases
"""
import sys
from pycrate_asn1dir import H225

M = H225.H323_MESSAGES
PROTO = (0, 0, 8, 2250, 0, 7)
V4 = ('ipAddress', {'ip': b'\x7f\x00\x00\x01', 'port': 1719})
TERMINAL = {'terminal': {}, 'mc': False, 'undefinedNode': False,
            'vendor': {'vendor': {'t35CountryCode': 4, 't35Extension': 0, 'manufacturerCode': 2},
                       'productId': b'Portico-test', 'versionId': b'1'}}


def alias(a):
    if a.startswith('email:'):
        return ('email-ID', a[6:])
    if a.startswith('url:'):
        return ('url-ID', a[4:])
    if a.isdigit():
        return ('dialledDigits', a)
    return ('h323-ID', a)


def ras(kind, gkid=None, aliases=()):
    if kind == 'grq':
        v = {'requestSeqNum': 1, 'protocolIdentifier': PROTO, 'rasAddress': V4,
             'endpointType': TERMINAL}
        if gkid:
            v['gatekeeperIdentifier'] = gkid
        if aliases:
            v['endpointAlias'] = [alias(a) for a in aliases]
        msg = ('gatekeeperRequest', v)
    elif kind == 'rrq':
        v = {'requestSeqNum': 2, 'protocolIdentifier': PROTO, 'discoveryComplete': True,
             'callSignalAddress': [('ipAddress', {'ip': b'\x7f\x00\x00\x01', 'port': 1720})],
             'rasAddress': [V4], 'terminalType': TERMINAL,
             'endpointVendor': TERMINAL['vendor'], 'timeToLive': 300, 'keepAlive': False}
        if gkid:
            v['gatekeeperIdentifier'] = gkid
        if aliases:
            v['terminalAlias'] = [alias(a) for a in aliases]
        msg = ('registrationRequest', v)
    elif kind == 'grj':
        msg = ('gatekeeperReject', {'requestSeqNum': 1, 'protocolIdentifier': PROTO,
                                    'rejectReason': ('securityDenial', 0)})
    elif kind == 'rrj':
        msg = ('registrationReject', {'requestSeqNum': 2, 'protocolIdentifier': PROTO,
                                      'rejectReason': ('securityDenial', 0)})
    elif kind == 'rcf':
        msg = ('registrationConfirm', {
            'requestSeqNum': 2, 'protocolIdentifier': PROTO,
            'callSignalAddress': [('ipAddress', {'ip': b'\x7f\x00\x00\x01', 'port': 1720})],
            'terminalAlias': [alias('alice')], 'gatekeeperIdentifier': 'example.com/branch',
            'endpointIdentifier': 'EP0001', 'timeToLive': 300, 'willRespondToIRR': False,
            'preGrantedARQ': {'makeCall': False, 'useGKCallSignalAddressToMakeCall': False,
                              'answerCall': False, 'useGKCallSignalAddressToAnswer': False},
            'maintainConnection': True})
    M.RasMessage.set_val(msg)
    return M.RasMessage.to_aper()


def h460_17(raw):
    return {'id': ('standard', 17),
            'parameters': [{'id': ('standard', 1), 'content': ('raw', raw)}]}


def uu(body, generic=None):
    pdu = {'h323-message-body': body}
    if generic is not None:
        pdu['genericData'] = generic
    M.H323_UserInformation.set_val({'h323-uu-pdu': pdu})
    return M.H323_UserInformation.to_aper()


def q931(msg_type, uu_per, crv=0):
    ies = bytes([0x7e]) + (len(uu_per) + 1).to_bytes(2, 'big') + b'\x05' + uu_per
    q = bytes([0x08, 0x02]) + crv.to_bytes(2, 'big') + bytes([msg_type]) + ies
    return bytes([3, 0]) + (len(q) + 4).to_bytes(2, 'big') + q


FACILITY, SETUP, RELEASE = 0x62, 0x05, 0x5a
CONF = b'\x11' * 16


def facility_body():
    return ('facility', {'protocolIdentifier': PROTO, 'conferenceID': CONF,
                         'reason': ('undefinedReason', 0)})


def main(argv):
    cmd, args = argv[0], argv[1:]
    if cmd in ('grq', 'rrq'):
        gkid = None if args[0] == '-' else args[0]
        raw = ras(cmd, gkid, args[1:])
        out = q931(FACILITY, uu(('empty', 0), [h460_17(raw)]))
    elif cmd in ('grj', 'rrj', 'rcf'):
        out = q931(FACILITY, uu(('empty', 0), [h460_17(ras(cmd))]), crv=0x8000)
    elif cmd == 'facility-body':
        out = q931(FACILITY, uu(facility_body(), [h460_17(ras('grq', args[0]))]))
    elif cmd == 'setup':
        body = ('setup', {'protocolIdentifier': PROTO, 'sourceInfo': TERMINAL,
                          'destinationAddress': [alias(a) for a in args],
                          'sourceAddress': [('h323-ID', 'caller')],
                          'activeMC': False, 'conferenceID': CONF,
                          'conferenceGoal': ('create', 0), 'callType': ('pointToPoint', 0),
                          'callIdentifier': {'guid': b'\x22' * 16},
                          'mediaWaitForConnect': False, 'canOverlapSend': False,
                          'multipleCalls': False, 'maintainConnection': True})
        out = q931(SETUP, uu(body), crv=1)
    elif cmd == 'release':
        body = ('releaseComplete', {'protocolIdentifier': PROTO})
        out = q931(RELEASE, uu(body), crv=0x8001)
    elif cmd == 'nested':
        depth = int(args[0])
        g = {'id': ('standard', 99), 'parameters': [{'id': ('standard', 1), 'content': ('bool', True)}]}
        for _ in range(depth):
            g = {'id': ('standard', 99), 'parameters': [{'id': ('standard', 2), 'content': ('nested', [g])}]}
        out = q931(FACILITY, uu(('empty', 0), [g, h460_17(ras('grq', 'example.com'))]))
    elif cmd == 'manyparams':
        n = int(args[0])
        g = {'id': ('standard', 99),
             'parameters': [{'id': ('standard', i % 100), 'content': ('bool', True)} for i in range(n)]}
        out = q931(FACILITY, uu(('empty', 0), [g, h460_17(ras('grq', 'example.com'))]))
    elif cmd == 'manyaliases':
        raw = ras('rrq', 'example.com', ['1'] * int(args[0]))
        out = q931(FACILITY, uu(('empty', 0), [h460_17(raw)]))
    else:
        raise SystemExit(__doc__)
    print(out.hex())


if __name__ == '__main__':
    main(sys.argv[1:])
