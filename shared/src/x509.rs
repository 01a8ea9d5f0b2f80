//! The few fields of an X.509 certificate the services read (RFC 5280): serial number,
//! validity, subject common name, subject alternative names, public key. A bounded DER
//! walk over the certificate's bytes: every length is checked against what is left
//! before anything is sliced, and nothing is allocated while parsing. It does not
//! verify anything; rustls and webpki do that before any peer certificate gets here.

use std::fmt;

/// Why a certificate could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Error(&'static str);

impl fmt::Display for X509Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed certificate: {}", self.0)
    }
}

impl std::error::Error for X509Error {}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
/// `[0] EXPLICIT Version`.
const VERSION: u8 = 0xa0;
/// `[3] EXPLICIT Extensions`.
const EXTENSIONS: u8 = 0xa3;
/// id-at-commonName, 2.5.4.3.
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// id-ce-subjectAltName, 2.5.29.17.
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
/// `GeneralName` `[2] dNSName` and `[7] iPAddress` (implicit, primitive).
const DNS_NAME: u8 = 0x82;
const IP_ADDRESS: u8 = 0x87;

/// DER values read one after another from a byte slice.
#[derive(Debug, Clone, Copy)]
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn peek(&self) -> Option<u8> {
        self.0.first().copied()
    }

    /// The next value's tag and contents.
    fn any(&mut self) -> Result<(u8, &'a [u8]), X509Error> {
        let (&tag, rest) = self.0.split_first().ok_or(X509Error("truncated"))?;
        if tag & 0x1f == 0x1f {
            return Err(X509Error("unsupported multi-byte tag"));
        }
        let (&first, mut rest) = rest.split_first().ok_or(X509Error("truncated"))?;
        let len = match first {
            0..=0x7f => usize::from(first),
            0x81..=0x84 => {
                let n = usize::from(first & 0x7f);
                if rest.len() < n {
                    return Err(X509Error("truncated length"));
                }
                let (bytes, after) = rest.split_at(n);
                rest = after;
                bytes.iter().fold(0usize, |l, &b| (l << 8) | usize::from(b))
            }
            _ => return Err(X509Error("unsupported length")),
        };
        if rest.len() < len {
            return Err(X509Error("value longer than what holds it"));
        }
        let (contents, after) = rest.split_at(len);
        self.0 = after;
        Ok((tag, contents))
    }

    /// The contents of the next value, which must have `tag`.
    fn expect(&mut self, tag: u8, what: &'static str) -> Result<&'a [u8], X509Error> {
        match self.any()? {
            (t, contents) if t == tag => Ok(contents),
            _ => Err(X509Error(what)),
        }
    }

    /// The contents of the next value if it has `tag`; nothing consumed otherwise.
    fn optional(&mut self, tag: u8) -> Result<Option<&'a [u8]>, X509Error> {
        if self.peek() == Some(tag) {
            self.any().map(|(_, c)| Some(c))
        } else {
            Ok(None)
        }
    }
}

/// A certificate's fields, borrowed from its DER.
#[derive(Debug, Clone)]
pub struct Certificate<'a> {
    serial: &'a [u8],
    not_before: i64,
    not_after: i64,
    /// The contents of the subject `Name`.
    subject: &'a [u8],
    /// The subject public key's bits (the `BIT STRING` without its unused-bits byte).
    public_key: &'a [u8],
    /// The contents of the `Extensions` sequence, when there is one.
    extensions: Option<&'a [u8]>,
}

/// Reads `der` as a certificate.
pub fn parse(der: &[u8]) -> Result<Certificate<'_>, X509Error> {
    let mut outer = Der(der);
    let cert = outer.expect(SEQUENCE, "not a certificate (a SEQUENCE)")?;
    if !outer.is_empty() {
        return Err(X509Error("bytes after the certificate"));
    }
    let mut tbs = Der(Der(cert).expect(SEQUENCE, "no TBSCertificate")?);
    tbs.optional(VERSION)?;
    let serial = tbs.expect(INTEGER, "no serial number")?;
    tbs.expect(SEQUENCE, "no signature algorithm")?;
    tbs.expect(SEQUENCE, "no issuer")?;
    let mut validity = Der(tbs.expect(SEQUENCE, "no validity")?);
    let not_before = time(&mut validity)?;
    let not_after = time(&mut validity)?;
    let subject = tbs.expect(SEQUENCE, "no subject")?;
    let mut spki = Der(tbs.expect(SEQUENCE, "no subject public key info")?);
    spki.expect(SEQUENCE, "no public key algorithm")?;
    let public_key = match spki.expect(BIT_STRING, "no public key")? {
        [0, bits @ ..] => bits,
        _ => return Err(X509Error("public key is not whole bytes")),
    };
    let mut extensions = None;
    while !tbs.is_empty() {
        let (tag, contents) = tbs.any()?;
        if tag == EXTENSIONS {
            extensions = Some(Der(contents).expect(SEQUENCE, "extensions are not a SEQUENCE")?);
        }
    }
    Ok(Certificate {
        serial,
        not_before,
        not_after,
        subject,
        public_key,
        extensions,
    })
}

impl<'a> Certificate<'a> {
    /// The serial number's bytes as encoded (big-endian, two's complement).
    pub fn serial(&self) -> &'a [u8] {
        self.serial
    }

    /// `notBefore` and `notAfter`, in seconds since the Unix epoch.
    pub fn validity(&self) -> (i64, i64) {
        (self.not_before, self.not_after)
    }

    /// The subject public key, as its bits.
    pub fn public_key(&self) -> &'a [u8] {
        self.public_key
    }

    /// The subject's first common name, when it is text.
    pub fn common_name(&self) -> Option<&'a str> {
        let mut rdns = Der(self.subject);
        while let Ok(rdn) = rdns.expect(SET, "") {
            let mut attrs = Der(rdn);
            while let Ok(attr) = attrs.expect(SEQUENCE, "") {
                let mut attr = Der(attr);
                if attr.expect(OID, "").ok() != Some(OID_COMMON_NAME) {
                    continue;
                }
                return match attr.any().ok()? {
                    // UTF8String, PrintableString, IA5String, VisibleString.
                    (0x0c | 0x13 | 0x16 | 0x1a, text) => std::str::from_utf8(text).ok(),
                    _ => None,
                };
            }
        }
        None
    }

    /// The DNS names and IP addresses of the subject alternative names, in order.
    pub fn subject_alt_names(&self) -> Result<Vec<AltName<'a>>, X509Error> {
        let Some(extensions) = self.extensions else {
            return Ok(Vec::new());
        };
        let mut extensions = Der(extensions);
        while !extensions.is_empty() {
            let mut ext = Der(extensions.expect(SEQUENCE, "an extension is not a SEQUENCE")?);
            let oid = ext.expect(OID, "an extension has no id")?;
            ext.optional(BOOLEAN)?;
            let value = ext.expect(OCTET_STRING, "an extension has no value")?;
            if oid != OID_SUBJECT_ALT_NAME {
                continue;
            }
            let mut names =
                Der(Der(value).expect(SEQUENCE, "subject alt names are not a SEQUENCE")?);
            let mut out = Vec::new();
            while !names.is_empty() {
                match names.any()? {
                    (DNS_NAME, name) => out.push(AltName::Dns(
                        std::str::from_utf8(name)
                            .map_err(|_| X509Error("a DNS name is not text"))?,
                    )),
                    (IP_ADDRESS, ip) => out.push(AltName::Ip(match ip.len() {
                        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(ip).expect("4 bytes")),
                        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(ip).expect("16 bytes")),
                        _ => return Err(X509Error("an IP address is neither 4 nor 16 bytes")),
                    })),
                    _ => {}
                }
            }
            return Ok(out);
        }
        Ok(Vec::new())
    }
}

/// A subject alternative name the services use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AltName<'a> {
    Dns(&'a str),
    Ip(std::net::IpAddr),
}

impl fmt::Display for AltName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dns(name) => f.write_str(name),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// A `Time` (UTCTime or GeneralizedTime, in the `Z` forms RFC 5280 requires), in
/// seconds since the Unix epoch.
fn time(der: &mut Der<'_>) -> Result<i64, X509Error> {
    let (tag, text) = der.any()?;
    let (year, rest) = match (tag, text) {
        (UTC_TIME, [y @ .., b'Z']) if y.len() == 12 => {
            let yy = digits(&y[..2])?;
            // RFC 5280, 4.1.2.5.1: 50..99 are 19xx, 00..49 are 20xx.
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &y[2..])
        }
        (GENERALIZED_TIME, [y @ .., b'Z']) if y.len() == 14 => (digits(&y[..4])?, &y[4..]),
        _ => {
            return Err(X509Error(
                "a time is not UTCTime or GeneralizedTime in Z form",
            ))
        }
    };
    let mut fields = [0i64; 5];
    for (field, pair) in fields.iter_mut().zip(rest.chunks_exact(2)) {
        *field = digits(pair)?;
    }
    let [month, day, hour, minute, second] = fields;
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(X509Error("a time is out of range"));
    }
    Ok(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

fn digits(text: &[u8]) -> Result<i64, X509Error> {
    text.iter().try_fold(0i64, |n, &b| {
        if b.is_ascii_digit() {
            Ok(n * 10 + i64::from(b - b'0'))
        } else {
            Err(X509Error("a time has a non-digit"))
        }
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    fn certificate(cn: &str, sans: Vec<SanType>, from: (i32, u8), until: (i32, u8)) -> Vec<u8> {
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::OrganizationName, "Updraft");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names = sans;
        p.not_before = rcgen::date_time_ymd(from.0, from.1, 1);
        p.not_after = rcgen::date_time_ymd(until.0, until.1, 28);
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x00, 0x9f, 0x12, 0x34]));
        let key = KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    fn samples() -> Vec<Vec<u8>> {
        vec![
            certificate(
                "board-7",
                vec![
                    SanType::DnsName("daemon.example".try_into().unwrap()),
                    SanType::IpAddress("10.0.0.1".parse().unwrap()),
                    SanType::IpAddress("fd00::1".parse().unwrap()),
                    SanType::DnsName("localhost".try_into().unwrap()),
                ],
                (2024, 2),
                (2026, 12),
            ),
            // Before 1970, and GeneralizedTime from 2050 on.
            certificate("old-and-long", vec![], (1969, 7), (2091, 3)),
        ]
    }

    #[test]
    fn reads_what_a_full_parser_reads() {
        for der in samples() {
            let ours = parse(&der).unwrap();
            let (_, theirs) = x509_parser::parse_x509_certificate(&der).unwrap();
            assert_eq!(ours.serial(), theirs.raw_serial());
            assert_eq!(
                ours.validity(),
                (
                    theirs.validity().not_before.timestamp(),
                    theirs.validity().not_after.timestamp()
                )
            );
            assert_eq!(
                ours.common_name(),
                theirs
                    .subject()
                    .iter_common_name()
                    .next()
                    .map(|c| c.as_str().unwrap())
            );
            assert_eq!(
                ours.public_key(),
                theirs.public_key().subject_public_key.data.as_ref()
            );
            let names: Vec<String> = ours
                .subject_alt_names()
                .unwrap()
                .iter()
                .map(ToString::to_string)
                .collect();
            let expected: Vec<String> = theirs
                .subject_alternative_name()
                .unwrap()
                .map(|san| {
                    san.value
                        .general_names
                        .iter()
                        .map(|n| match n {
                            x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
                            x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                                4 => std::net::IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()),
                                _ => std::net::IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()),
                            }
                            .to_string(),
                            other => panic!("{other:?}"),
                        })
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(names, expected);
        }
        let sample = samples().swap_remove(0);
        let first = parse(&sample).unwrap();
        assert_eq!(first.common_name(), Some("board-7"));
        assert_eq!(first.serial(), [0x00, 0x9f, 0x12, 0x34]);
    }

    #[test]
    fn cut_or_changed_bytes_give_an_error_or_a_reading_never_a_panic() {
        for der in samples() {
            for len in 0..der.len() {
                assert!(
                    parse(&der[..len]).is_err(),
                    "a certificate cut at {len} parsed"
                );
            }
            let mut longer = der.clone();
            longer.push(0);
            assert!(parse(&longer).is_err());
            for i in 0..der.len() {
                for flip in [0x01, 0x80, 0xff] {
                    let mut bad = der.clone();
                    bad[i] ^= flip;
                    if let Ok(c) = parse(&bad) {
                        let _ = (c.common_name(), c.subject_alt_names(), c.validity());
                    }
                }
            }
        }
    }

    #[test]
    fn lengths_past_the_end_and_odd_forms_are_refused() {
        assert!(parse(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(parse(&[0x30, 0x80, 0x00, 0x00]).is_err());
        assert!(parse(&[0x30, 0x85, 1, 0, 0, 0, 0]).is_err());
        assert!(parse(&[0x3f, 0x01, 0x00]).is_err());
        assert!(parse(&[]).is_err());
    }

    #[test]
    fn days_match_the_calendar() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(
            days_from_civil(2024, 2, 29) + 1,
            days_from_civil(2024, 3, 1)
        );
    }
}
