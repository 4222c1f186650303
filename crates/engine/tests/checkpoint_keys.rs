//! The real networks, built from the presets without allocating their weights, must ask for
//! exactly the keys of an official checkpoint (`tests/data/checkpoint_keys_1024.tsv`, from `docs/spec/checkpoint.md`; 2520 entries).

use dynamicrafter_engine::{ModelConfig, Pipeline};
use std::collections::BTreeMap;

fn spec_1024() -> BTreeMap<String, Vec<usize>> {
    let text = include_str!("data/checkpoint_keys_1024.tsv");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (k, shape) = l.split_once('\t').expect("key<TAB>shape");
            let dims = shape
                .trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse().unwrap())
                .collect();
            (k.to_string(), dims)
        })
        .collect()
}

fn diff(got: &BTreeMap<String, Vec<usize>>, want: &BTreeMap<String, Vec<usize>>) -> Vec<String> {
    let mut out = Vec::new();
    for (k, s) in want {
        match got.get(k) {
            None => out.push(format!("missing {k}")),
            Some(g) if g != s => out.push(format!("{k}: {g:?} vs {s:?}")),
            _ => {}
        }
    }
    out.extend(got.keys().filter(|k| !want.contains_key(*k)).map(|k| format!("extra {k}")));
    out
}

#[test]
fn presets_1024_and_512_match_the_checkpoint_key_list() {
    let want = spec_1024();
    assert_eq!(want.len(), 2520);
    for name in ["1024", "512", "512_interp"] {
        let got = Pipeline::checkpoint_keys(&ModelConfig::preset(name).unwrap()).unwrap();
        let d = diff(&got, &want);
        assert!(d.is_empty(), "{name}: {} differences: {:?}", d.len(), &d[..d.len().min(20)]);
    }
}

#[test]
fn preset_256_differs_as_the_spec_says() {
    // 256: no scale_arr, one learned `attn2.alpha` scalar per spatial transformer (16).
    let mut want = spec_1024();
    want.remove("scale_arr");
    let spatial: Vec<String> = want
        .keys()
        .filter(|k| k.ends_with("attn2.to_k_ip.weight"))
        .map(|k| k.replace("to_k_ip.weight", "alpha"))
        .collect();
    assert_eq!(spatial.len(), 16);
    want.extend(spatial.into_iter().map(|k| (k, vec![])));
    let got = Pipeline::checkpoint_keys(&ModelConfig::preset("256").unwrap()).unwrap();
    assert_eq!(got.len(), 2535);
    let d = diff(&got, &want);
    assert!(d.is_empty(), "256: {:?}", &d[..d.len().min(20)]);
}
