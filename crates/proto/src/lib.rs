//! The tier gRPC protocol, generated from `proto/strata/v1`. Only tier crates see these
//! types; they convert them to domain types on receipt.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("strata.v1");

    /// Encoded descriptor set of `strata.v1`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("strata_v1_descriptor");
}

/// Arrow frames are Flight messages under another name: converting moves the buffers.
mod frames {
    use super::v1::ArrowFrame;
    use arrow_flight::FlightData;

    impl From<FlightData> for ArrowFrame {
        fn from(data: FlightData) -> Self {
            Self { data_header: data.data_header, data_body: data.data_body, app_metadata: data.app_metadata }
        }
    }

    impl From<ArrowFrame> for FlightData {
        fn from(frame: ArrowFrame) -> Self {
            FlightData {
                flight_descriptor: None,
                data_header: frame.data_header,
                data_body: frame.data_body,
                app_metadata: frame.app_metadata,
            }
        }
    }

    impl ArrowFrame {
        /// Bytes on the wire, for transfer accounting.
        pub fn size(&self) -> usize {
            self.data_header.len() + self.data_body.len() + self.app_metadata.len()
        }
    }
}
