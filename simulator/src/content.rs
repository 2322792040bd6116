//! What the image's chunks contain, as far as fetching is concerned.
//!
//! A real image is not a run of distinct chunks: unused space gives all-zero chunks, which a node
//! never fetches (the manifest names them, and reads of them return zeros), and duplicated files
//! give chunks with equal content, which a node's store keeps once under one id (a read of the
//! second copy is local once the first is stored). [`Content`] records which chunks are zero and
//! which share content, so the simulated hosts fetch exactly what a node would. Without one a
//! scenario's chunks are all distinct.
//!
//! A layout comes from an image's chunk ids ([`Content::from_ids`]: the testnet's generated image)
//! or from a JSON file named in the scenario (`[image] content = "layout.json"`, as the testnet's
//! `run` writes it): an array with one entry per chunk, `null` for an all-zero chunk, otherwise the
//! index of the first chunk with the same content.

use std::collections::HashMap;
use std::path::Path;

use vmswarm_protocol::ChunkId;

/// Errors in a content layout.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// The file could not be read.
    #[error("reading content layout {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a JSON array of nulls and indices.
    #[error("content layout {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The layout does not describe the image.
    #[error("content layout has {got} chunks, the image {expected}")]
    Length {
        /// The image's chunk count.
        expected: u32,
        /// The layout's.
        got: u32,
    },
    /// An entry names a later chunk or itself as its first copy, or a zero chunk.
    #[error(
        "content layout: chunk {index} says it copies chunk {of}, which is not an earlier distinct chunk"
    )]
    BadCopy {
        /// The chunk.
        index: u32,
        /// The chunk it names.
        of: u32,
    },
}

/// Which chunks are zero and which share content (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    /// Per chunk: `None` for all-zero, else the first index with the same content.
    first: Vec<Option<u32>>,
    /// Every group of two or more chunks with equal content, keyed by its first index.
    groups: HashMap<u32, Vec<u32>>,
}

impl Content {
    /// `chunks` distinct chunks, none zero.
    pub fn distinct(chunks: u32) -> Content {
        Content {
            first: (0..chunks).map(Some).collect(),
            groups: HashMap::new(),
        }
    }

    /// The layout of an image whose chunks have `ids`; `zero` tells the ids of all-zero chunks.
    pub fn from_ids(ids: &[ChunkId], zero: impl Fn(u32, &ChunkId) -> bool) -> Content {
        let mut seen: HashMap<&ChunkId, u32> = HashMap::new();
        let first = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let i = i as u32;
                (!zero(i, id)).then(|| *seen.entry(id).or_insert(i))
            })
            .collect();
        Content::build(first)
    }

    /// Checks and indexes a per-chunk list (see the module docs for its meaning).
    pub fn from_firsts(first: Vec<Option<u32>>) -> Result<Content, ContentError> {
        for (i, f) in first.iter().enumerate() {
            if let Some(of) = *f {
                let i = i as u32;
                let ok = of == i || (of < i && first[of as usize] == Some(of));
                if !ok {
                    return Err(ContentError::BadCopy { index: i, of });
                }
            }
        }
        Ok(Content::build(first))
    }

    fn build(first: Vec<Option<u32>>) -> Content {
        let mut groups: HashMap<u32, Vec<u32>> = HashMap::new();
        for (i, f) in first.iter().enumerate() {
            if let Some(of) = *f {
                if of != i as u32 {
                    groups.entry(of).or_insert_with(|| vec![of]).push(i as u32);
                }
            }
        }
        Content { first, groups }
    }

    /// Reads a layout file (a JSON array, see the module docs).
    pub fn load(path: &Path) -> Result<Content, ContentError> {
        let text = std::fs::read_to_string(path).map_err(|source| ContentError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let first: Vec<Option<u32>> =
            serde_json::from_str(&text).map_err(|e| ContentError::Parse {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        Content::from_firsts(first)
    }

    /// The layout as the JSON array [`Content::load`] reads.
    pub fn to_json(&self) -> String {
        // Serialising a Vec<Option<u32>> cannot fail.
        serde_json::to_string(&self.first).unwrap_or_default()
    }

    /// How many chunks it describes.
    pub fn chunk_count(&self) -> u32 {
        self.first.len() as u32
    }

    /// Checks that it describes an image of `chunks` chunks.
    pub fn check_len(&self, chunks: u32) -> Result<(), ContentError> {
        if self.chunk_count() == chunks {
            Ok(())
        } else {
            Err(ContentError::Length {
                expected: chunks,
                got: self.chunk_count(),
            })
        }
    }

    /// Whether chunk `index` is all zeros (never fetched).
    pub fn is_zero(&self, index: u32) -> bool {
        self.first.get(index as usize).is_some_and(Option::is_none)
    }

    /// The chunks with the same content as `index`, `index` included, when there are others;
    /// empty when it is distinct or zero.
    pub fn group(&self, index: u32) -> &[u32] {
        self.first
            .get(index as usize)
            .copied()
            .flatten()
            .and_then(|of| self.groups.get(&of))
            .map_or(&[], Vec::as_slice)
    }

    /// Counts: (zero chunks, chunks that copy an earlier one, distinct non-zero chunks).
    pub fn summary(&self) -> (u32, u32, u32) {
        let zero = self.first.iter().filter(|f| f.is_none()).count() as u32;
        let copies = self
            .groups
            .values()
            .map(|g| g.len() as u32 - 1)
            .sum::<u32>();
        (zero, copies, self.chunk_count() - zero - copies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> ChunkId {
        ChunkId([b; 32])
    }

    #[test]
    fn ids_give_zero_chunks_and_groups() {
        let ids = [id(1), id(0), id(2), id(1), id(0), id(1), id(3)];
        let c = Content::from_ids(&ids, |_, x| *x == id(0));
        assert!(c.is_zero(1) && c.is_zero(4) && !c.is_zero(0));
        assert_eq!(c.group(5), &[0, 3, 5]);
        assert_eq!(c.group(0), &[0, 3, 5]);
        assert!(c.group(2).is_empty() && c.group(1).is_empty() && c.group(99).is_empty());
        assert_eq!(c.summary(), (2, 2, 3));
        let back = Content::from_firsts(serde_json::from_str(&c.to_json()).unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(Content::distinct(3).summary(), (0, 0, 3));
    }

    #[test]
    fn bad_layouts_are_refused() {
        assert!(matches!(
            Content::from_firsts(vec![Some(0), Some(2), Some(2)]),
            Err(ContentError::BadCopy { index: 1, of: 2 })
        ));
        assert!(matches!(
            Content::from_firsts(vec![None, Some(0)]),
            Err(ContentError::BadCopy { index: 1, of: 0 })
        ));
        assert!(matches!(
            Content::from_firsts(vec![Some(1)]),
            Err(ContentError::BadCopy { index: 0, of: 1 })
        ));
        assert!(Content::distinct(4).check_len(5).is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        std::fs::write(&p, "[0, \"x\"]").unwrap();
        let e = Content::load(&p).unwrap_err().to_string();
        assert!(e.contains("c.json"), "{e}");
    }
}
