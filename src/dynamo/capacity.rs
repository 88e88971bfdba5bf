//! Read capacity as DynamoDB bills it.
//!
//! Item size is the sum, over attributes, of the UTF-8 length of the name plus the size of the
//! value (strings: UTF-8 bytes; numbers: about one byte per two significant digits plus one;
//! binary: bytes; booleans and null: 1; maps and lists: 3 bytes plus their elements, 1 byte per
//! element). A Scan page is billed on the total size of the items it read, rounded up to the next
//! 4 KB, at 1 RCU per 4 KB for strongly consistent reads and 0.5 for eventually consistent ones
//! (the Scan default). GetItem rounds each item up to 4 KB on its own.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;

const UNIT: f64 = 4096.0;

/// The billed size of one attribute value.
pub fn value_size(v: &AttributeValue) -> usize {
    match v {
        AttributeValue::S(s) => s.len(),
        AttributeValue::N(n) => {
            let digits = n.chars().filter(char::is_ascii_digit).count();
            digits.div_ceil(2) + 1
        }
        AttributeValue::B(b) => b.as_ref().len(),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::M(m) => 3 + m.iter().map(|(k, v)| k.len() + value_size(v) + 1).sum::<usize>(),
        AttributeValue::L(l) => 3 + l.iter().map(|v| value_size(v) + 1).sum::<usize>(),
        AttributeValue::Ss(s) => s.iter().map(String::len).sum(),
        AttributeValue::Ns(n) => n.iter().map(|x| value_size(&AttributeValue::N(x.clone()))).sum(),
        AttributeValue::Bs(b) => b.iter().map(|x| x.as_ref().len()).sum(),
        _ => 0,
    }
}

/// The billed size of one item.
pub fn item_size(item: &HashMap<String, AttributeValue>) -> usize {
    item.iter().map(|(k, v)| k.len() + value_size(v)).sum()
}

/// RCUs of one Scan page.
pub fn scan_page_read_units(items: &[HashMap<String, AttributeValue>], consistent: bool) -> f64 {
    let bytes: usize = items.iter().map(item_size).sum();
    let units = (bytes as f64 / UNIT).ceil().max(1.0);
    if consistent { units } else { units / 2.0 }
}

/// RCUs of one GetItem.
pub fn get_item_read_units(item: Option<&HashMap<String, AttributeValue>>, consistent: bool) -> f64 {
    let units = (item.map_or(0, item_size) as f64 / UNIT).ceil().max(1.0);
    if consistent { units } else { units / 2.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> AttributeValue {
        AttributeValue::S(v.to_owned())
    }

    #[test]
    fn sizes_and_rounding() {
        let digest: HashMap<String, AttributeValue> =
            [("LockID".to_owned(), s("tfstate/app/terraform.tfstate-md5")), ("Digest".to_owned(), s("68018aa8c310c3abe7ba9ee609fcf862"))]
                .into();
        assert_eq!(item_size(&digest), 6 + 33 + 6 + 32);
        // 100 such items are 7,700 bytes: two 4 KB units, half that when eventually consistent.
        let page = vec![digest.clone(); 100];
        assert_eq!(scan_page_read_units(&page, true), 2.0);
        assert_eq!(scan_page_read_units(&page, false), 1.0);
        // An empty page still costs the minimum.
        assert_eq!(scan_page_read_units(&[], false), 0.5);
        assert_eq!(get_item_read_units(Some(&digest), true), 1.0);
        assert_eq!(value_size(&AttributeValue::N("12345".into())), 4);
    }
}
