//! The WIDER FACE validation ground truth: events → images → face boxes, and which faces each of
//! the Easy / Medium / Hard subsets counts.
//!
//! [`GroundTruth::load`] reads the four official MAT-files; tests and tools can also build a
//! [`GroundTruth`] in memory. The evaluation only ever sees the struct.

use std::path::Path;

use super::mat::{MatArray, MatFile};
use crate::{Error, Result};

/// One of the three evaluation subsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Subset {
    Easy,
    Medium,
    Hard,
}

impl Subset {
    /// The three subsets in the order the standard script reports them.
    pub const ALL: [Subset; 3] = [Subset::Easy, Subset::Medium, Subset::Hard];

    /// Position in [`Subset::ALL`] (and in [`GtImage::kept`]).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Lower-case name: `easy`, `medium`, `hard`.
    pub fn name(self) -> &'static str {
        match self {
            Subset::Easy => "easy",
            Subset::Medium => "medium",
            Subset::Hard => "hard",
        }
    }

    /// Capitalised name: `Easy`, `Medium`, `Hard`.
    pub fn label(self) -> &'static str {
        match self {
            Subset::Easy => "Easy",
            Subset::Medium => "Medium",
            Subset::Hard => "Hard",
        }
    }

    /// The ground-truth file that lists this subset's faces.
    pub fn mat_file_name(self) -> &'static str {
        match self {
            Subset::Easy => "wider_easy_val.mat",
            Subset::Medium => "wider_medium_val.mat",
            Subset::Hard => "wider_hard_val.mat",
        }
    }
}

/// The file with every event, image name and face box.
pub const ALL_FACES_MAT: &str = "wider_face_val.mat";

/// One validation image.
#[derive(Clone, Debug, PartialEq)]
pub struct GtImage {
    /// Image name without extension, e.g. `0_Parade_marchingband_1_465`.
    pub name: String,
    /// Faces as `[x, y, w, h]` in pixels, used as they are (degenerate boxes included).
    pub boxes: Vec<[f64; 4]>,
    /// Per subset (indexed by [`Subset::index`]): 0-based indices into `boxes` of the faces the
    /// subset counts, in file order. A repeated index counts twice in the face total, as in the
    /// standard script.
    pub kept: [Vec<usize>; 3],
}

/// One event (a folder of images), e.g. `0--Parade`.
#[derive(Clone, Debug, PartialEq)]
pub struct GtEvent {
    pub name: String,
    pub images: Vec<GtImage>,
}

/// The whole ground truth, events and images in file order.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct GroundTruth {
    pub events: Vec<GtEvent>,
}

impl GroundTruth {
    /// Loads `wider_face_val.mat` and `wider_{easy,medium,hard}_val.mat` from `dir`.
    pub fn load(dir: &Path) -> Result<GroundTruth> {
        let all = MatFile::read(&dir.join(ALL_FACES_MAT))?;
        let mut subsets = Vec::with_capacity(3);
        for s in Subset::ALL {
            subsets.push(MatFile::read(&dir.join(s.mat_file_name()))?);
        }
        GroundTruth::from_mat_files(&all, [&subsets[0], &subsets[1], &subsets[2]]).map_err(|e| match e {
            Error::WiderFace(msg) => Error::WiderFace(format!("ground truth in {}: {msg}", dir.display())),
            other => other,
        })
    }

    /// Builds the ground truth from the parsed files: events, names and boxes from `all`
    /// (`event_list`, `file_list`, `face_bbx_list`), each subset's faces from its file's `gt_list`
    /// (`subsets` in the order Easy, Medium, Hard), as the standard script does.
    pub fn from_mat_files(all: &MatFile, subsets: [&MatFile; 3]) -> Result<GroundTruth> {
        let event_list = all.variable("event_list")?.cell("event_list")?;
        let file_list = all.variable("file_list")?.cell("file_list")?;
        let bbx_list = all.variable("face_bbx_list")?.cell("face_bbx_list")?;
        let mut gt_lists = Vec::with_capacity(3);
        for (s, file) in Subset::ALL.iter().zip(subsets) {
            let what = format!("{}: gt_list", s.mat_file_name());
            let list = file.variable("gt_list").map_err(|e| prefix(e, s.mat_file_name()))?.cell(&what)?;
            gt_lists.push((what, list));
        }
        let n_events = event_list.len();
        check_len(file_list.len(), n_events, "file_list", "event_list")?;
        check_len(bbx_list.len(), n_events, "face_bbx_list", "event_list")?;
        for (what, list) in &gt_lists {
            check_len(list.len(), n_events, what, "event_list")?;
        }

        let mut events = Vec::with_capacity(n_events);
        for i in 0..n_events {
            let name = event_list[i].string(&format!("event_list{{{}}}", i + 1))?;
            let files = file_list[i].cell(&format!("file_list{{{}}}", i + 1))?;
            let bbxs = bbx_list[i].cell(&format!("face_bbx_list{{{}}}", i + 1))?;
            check_len(
                bbxs.len(),
                files.len(),
                &format!("face_bbx_list{{{}}}", i + 1),
                &format!("file_list{{{}}}", i + 1),
            )?;
            let mut subset_cells = Vec::with_capacity(3);
            for (what, list) in &gt_lists {
                let what = format!("{what}{{{}}}", i + 1);
                let cells = list[i].cell(&what)?;
                check_len(cells.len(), files.len(), &what, &format!("file_list{{{}}}", i + 1))?;
                subset_cells.push((what, cells));
            }
            let mut images = Vec::with_capacity(files.len());
            for j in 0..files.len() {
                let at = format!("{{{}}}{{{}}}", i + 1, j + 1);
                let name = files[j].string(&format!("file_list{at}"))?;
                let boxes = read_boxes(&bbxs[j], &format!("face_bbx_list{at} ({name})"))?;
                let mut kept: [Vec<usize>; 3] = Default::default();
                for (k, (what, cells)) in subset_cells.iter().enumerate() {
                    kept[k] = read_indices(&cells[j], boxes.len(), &format!("{what}{{{}}} ({name})", j + 1))?;
                }
                images.push(GtImage { name, boxes, kept });
            }
            events.push(GtEvent { name, images });
        }
        Ok(GroundTruth { events })
    }

    /// Checks what the evaluation relies on: every kept index names a box of its image.
    pub fn validate(&self) -> Result<()> {
        for event in &self.events {
            for image in &event.images {
                for s in Subset::ALL {
                    if let Some(&bad) = image.kept[s.index()].iter().find(|&&k| k >= image.boxes.len()) {
                        return Err(Error::WiderFace(format!(
                            "ground truth {}/{}: {} subset keeps face index {bad} (0-based) but the image has {} boxes",
                            event.name,
                            image.name,
                            s.name(),
                            image.boxes.len()
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Number of images over all events.
    pub fn image_count(&self) -> usize {
        self.events.iter().map(|e| e.images.len()).sum()
    }

    /// Number of face boxes over all images.
    pub fn box_count(&self) -> usize {
        self.events.iter().flat_map(|e| &e.images).map(|i| i.boxes.len()).sum()
    }

    /// Number of faces a subset counts (the denominator of its recall).
    pub fn face_count(&self, subset: Subset) -> usize {
        self.events.iter().flat_map(|e| &e.images).map(|i| i.kept[subset.index()].len()).sum()
    }
}

fn prefix(e: Error, file: &str) -> Error {
    match e {
        Error::WiderFace(msg) => Error::WiderFace(format!("{file}: {msg}")),
        other => other,
    }
}

fn check_len(found: usize, expected: usize, what: &str, against: &str) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(Error::WiderFace(format!("{what} has {found} entries but {against} has {expected}")))
    }
}

/// An N x 4 box array (or any empty array: no faces), as f64 rows `x y w h`.
fn read_boxes(array: &MatArray, what: &str) -> Result<Vec<[f64; 4]>> {
    let values = array.numbers(what)?.to_f64();
    if values.is_empty() {
        return Ok(Vec::new());
    }
    if array.dims.len() != 2 || array.dims[1] != 4 {
        return Err(Error::WiderFace(format!(
            "{what}: expected an N x 4 box array, found dimensions {:?}",
            array.dims
        )));
    }
    let n = array.dims[0];
    // Column-major: element (row, col) is at col * n + row.
    Ok((0..n).map(|row| [values[row], values[n + row], values[2 * n + row], values[3 * n + row]]).collect())
}

/// A K x 1 list of 1-based face indices (or an empty 0 x 0 / 0 x 1 one), as 0-based indices.
fn read_indices(array: &MatArray, n_boxes: usize, what: &str) -> Result<Vec<usize>> {
    let numbers = array.numbers(what)?;
    if numbers.is_empty() && array.dims.first() == Some(&0) {
        return Ok(Vec::new());
    }
    // The script counts len(list) = rows: only a column makes that equal to the number of indices.
    if array.dims.len() != 2 || array.dims[1] != 1 {
        return Err(Error::WiderFace(format!(
            "{what}: expected a K x 1 index list, found dimensions {:?}",
            array.dims
        )));
    }
    // The files declare class double but store uint8/uint16 (what scipy returns, and what the
    // script indexes with): any class is accepted as long as the values are whole numbers.
    numbers
        .to_f64()
        .into_iter()
        .map(|k| {
            if k.fract() == 0.0 && k >= 1.0 && k <= n_boxes as f64 {
                Ok(k as usize - 1)
            } else {
                Err(Error::WiderFace(format!("{what}: face index {k} is not a whole number in 1..={n_boxes}")))
            }
        })
        .collect()
}
