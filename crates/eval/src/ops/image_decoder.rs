//! ImageDecoder (opset 20): an encoded image (a 1-D uint8 tensor holding a
//! BMP, JPEG, PNG, TIFF, WebP or PNM file) decoded to uint8 pixels of shape
//! (height, width, channels) in RGB, BGR or grayscale order.
//!
//! Decoding is the `image` crate's. Grayscale is computed from RGB with the
//! ITU-R 601-2 luma weights in the fixed-point rounding Pillow uses (which
//! ONNX's reference calls), not the crate's own luma conversion. JPEG 2000
//! is refused: the crate has no decoder for it.

use super::{array, input, Kernel};
use crate::{EvalError, OpCtx};
use image::ImageFormat;
use qgraph_ir::Tensor;

pub const KERNELS: &[(&str, Kernel)] = &[("ImageDecoder", image_decoder)];

/// The channel order of the decoded pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
enum PixelFormat {
    Rgb,
    Bgr,
    Grayscale,
}

impl PixelFormat {
    fn parse(cx: &OpCtx, name: &str) -> Result<Self, EvalError> {
        match name {
            "RGB" => Ok(PixelFormat::Rgb),
            "BGR" => Ok(PixelFormat::Bgr),
            "Grayscale" => Ok(PixelFormat::Grayscale),
            other => cx.err(format!(
                "pixel_format '{other}' is not one of 'RGB', 'BGR', 'Grayscale'"
            )),
        }
    }

    fn channels(self) -> usize {
        match self {
            PixelFormat::Grayscale => 1,
            PixelFormat::Rgb | PixelFormat::Bgr => 3,
        }
    }
}

/// Whether `bytes` start like a JPEG 2000 file: the JP2 container's
/// signature box, or a raw codestream's SOC + SIZ markers.
fn is_jpeg2000(bytes: &[u8]) -> bool {
    const JP2_SIGNATURE: &[u8] = &[
        0x00, 0x00, 0x00, 0x0C, 0x6A, 0x50, 0x20, 0x20, 0x0D, 0x0A, 0x87, 0x0A,
    ];
    const CODESTREAM: &[u8] = &[0xFF, 0x4F, 0xFF, 0x51];
    bytes.starts_with(JP2_SIGNATURE) || bytes.starts_with(CODESTREAM)
}

/// The formats the operator names and this build decodes.
const FORMATS: &[ImageFormat] = &[
    ImageFormat::Bmp,
    ImageFormat::Jpeg,
    ImageFormat::Png,
    ImageFormat::Tiff,
    ImageFormat::WebP,
    ImageFormat::Pnm,
];

/// Pillow's `convert("L")` of one RGB pixel: 601-2 luma in 16-bit fixed
/// point, rounded half up.
fn luma(rgb: &[u8]) -> u8 {
    let weighted = rgb[0] as u32 * 19595 + rgb[1] as u32 * 38470 + rgb[2] as u32 * 7471 + 0x8000;
    (weighted >> 16) as u8
}

fn image_decoder(cx: &OpCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, EvalError> {
    let pixel_format = PixelFormat::parse(cx, &cx.string_attr("pixel_format", "RGB")?)?;
    let encoded = match input(cx, inputs, 0)? {
        Tensor::U8(a) if a.ndim() == 1 => a,
        other => {
            return cx.err(format!(
                "encoded_stream must be a 1-D uint8 tensor, got {} of shape {:?}",
                other.dtype(),
                other.shape()
            ))
        }
    };
    let bytes: Vec<u8> = encoded.iter().copied().collect();
    if is_jpeg2000(&bytes) {
        return cx.err(
            "this is a JPEG 2000 image, which the evaluator cannot decode: the `image` crate it \
             uses has no JPEG 2000 decoder",
        );
    }
    // The operator returns an empty image for a stream it cannot decode
    // (an unknown format, a corrupt file).
    let empty = || {
        Ok(vec![Tensor::U8(array(
            &[0, 0, pixel_format.channels()],
            vec![],
        ))])
    };
    let Some(format) = image::guess_format(&bytes)
        .ok()
        .filter(|f| FORMATS.contains(f))
    else {
        return empty();
    };
    let Ok(decoded) = image::load_from_memory_with_format(&bytes, format) else {
        return empty();
    };
    let rgb = decoded.to_rgb8();
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    let pixels = rgb.as_raw();
    let data: Vec<u8> = match pixel_format {
        PixelFormat::Rgb => pixels.clone(),
        PixelFormat::Bgr => pixels
            .chunks_exact(3)
            .flat_map(|p| [p[2], p[1], p[0]])
            .collect(),
        PixelFormat::Grayscale => pixels.chunks_exact(3).map(luma).collect(),
    };
    Ok(vec![Tensor::U8(array(
        &[height, width, pixel_format.channels()],
        data,
    ))])
}

#[cfg(test)]
mod tests {
    use super::*;
    use qgraph_ir::{AttrValue, Graph, NewNode};

    fn decode(bytes: &[u8], pixel_format: &str) -> Result<Vec<Tensor>, EvalError> {
        let mut graph = Graph::new("test");
        let node = NewNode::new("ImageDecoder").attr(
            "pixel_format",
            AttrValue::String(pixel_format.as_bytes().to_vec()),
        );
        let id = graph.add_node(node).expect("a node without edges");
        let encoded = Tensor::U8(array(&[bytes.len()], bytes.to_vec()));
        crate::run_node(&graph, id, 20, &[Some(&encoded)])
    }

    fn u8s(t: &Tensor) -> (Vec<usize>, Vec<u8>) {
        match t {
            Tensor::U8(a) => (a.shape().to_vec(), a.iter().copied().collect()),
            other => panic!("expected uint8, found {}", other.dtype()),
        }
    }

    /// A 2x1 binary PPM: a red pixel then a (10, 20, 30) one.
    fn ppm() -> Vec<u8> {
        let mut bytes = b"P6\n2 1\n255\n".to_vec();
        bytes.extend_from_slice(&[255, 0, 0, 10, 20, 30]);
        bytes
    }

    #[test]
    fn decodes_pnm_in_each_pixel_format() {
        let rgb = decode(&ppm(), "RGB").unwrap();
        assert_eq!(u8s(&rgb[0]), (vec![1, 2, 3], vec![255, 0, 0, 10, 20, 30]));
        let bgr = decode(&ppm(), "BGR").unwrap();
        assert_eq!(u8s(&bgr[0]).1, vec![0, 0, 255, 30, 20, 10]);
        let gray = decode(&ppm(), "Grayscale").unwrap();
        // Pillow: (255 * 19595 + 32768) >> 16 = 76; (10, 20, 30) -> 18.
        assert_eq!(u8s(&gray[0]), (vec![1, 2, 1], vec![76, 18]));
    }

    #[test]
    fn undecodable_streams_give_an_empty_image() {
        let out = decode(b"not an image", "RGB").unwrap();
        assert_eq!(u8s(&out[0]).0, vec![0, 0, 3]);
        let truncated = &ppm()[..12];
        assert_eq!(
            u8s(&decode(truncated, "Grayscale").unwrap()[0]).0,
            vec![0, 0, 1]
        );
    }

    #[test]
    fn jpeg2000_and_bad_arguments_are_refused() {
        let jp2 = [
            0x00, 0x00, 0x00, 0x0C, 0x6A, 0x50, 0x20, 0x20, 0x0D, 0x0A, 0x87, 0x0A, 0,
        ];
        let err = decode(&jp2, "RGB").unwrap_err().to_string();
        assert!(err.contains("JPEG 2000"), "{err}");
        assert!(decode(&ppm(), "CMYK").is_err());
    }
}
