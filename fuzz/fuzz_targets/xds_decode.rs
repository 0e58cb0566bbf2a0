//! xDS resource decoding (`xds::convert::decode_address` / `decode_authorization`): the
//! bytes of a pushed `Any`, decoded as each of the two resource types ztunnel subscribes to.
//!
//! Oracle: no panic; a resource that is accepted survives the trip back to a proto (what
//! the built-in control plane serves) unchanged. Replayed by the unit test
//! `xds::corpus_tests` — keep the two in step.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost_types::Any;
use ztunnel::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use ztunnel::xds::convert::{
    address_to_any, authorization_to_any, decode_address, decode_authorization,
};

fuzz_target!(|data: &[u8]| {
    let any = |type_url: &str| Any {
        type_url: type_url.to_string(),
        value: data.to_vec(),
    };
    if let Ok(address) = decode_address(&any(ADDRESS_TYPE_URL)) {
        let again = decode_address(&address_to_any(&address)).expect("re-encoded address");
        assert_eq!(again, address);
    }
    if let Ok(policy) = decode_authorization(&any(AUTHORIZATION_TYPE_URL)) {
        let again = decode_authorization(&authorization_to_any(&policy)).expect("re-encoded");
        assert_eq!(again, policy);
    }
});
