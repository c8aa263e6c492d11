//! The tier gRPC protocol, generated from `proto/strata/v1`. Only tier crates see these
//! types; they convert them to domain types on receipt.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("strata.v1");

    /// Encoded descriptor set of `strata.v1`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("strata_v1_descriptor");
}

/// The protobuf codec of the tier protocol: prost's, except that a request that does not
/// decode is answered INVALID_ARGUMENT (the sender's fault) instead of INTERNAL, which
/// would tell an operator that the server is broken.
pub mod codec {
    use tonic::Status;
    use tonic::codec::{Codec, DecodeBuf, Decoder};
    use tonic_prost::{ProstCodec, ProstDecoder};

    #[derive(Debug, Clone, Default)]
    pub struct TierCodec<T, U>(ProstCodec<T, U>);

    impl<T, U> Codec for TierCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
        type Decoder = TierDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            self.0.encoder()
        }

        fn decoder(&mut self) -> Self::Decoder {
            TierDecoder(self.0.decoder())
        }
    }

    #[derive(Debug, Clone)]
    pub struct TierDecoder<U>(ProstDecoder<U>);

    impl<U: prost::Message + Default> Decoder for TierDecoder<U> {
        type Item = U;
        type Error = Status;

        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
            self.0.decode(buf).map_err(|status| {
                Status::invalid_argument(format!("malformed strata.v1 message: {}", status.message()))
            })
        }

        fn buffer_settings(&self) -> tonic::codec::BufferSettings {
            self.0.buffer_settings()
        }
    }
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
