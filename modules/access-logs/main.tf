locals {
  tags         = merge(var.tags, { "karrots:module" = "access-logs" })
  policies_dir = coalesce(var.policies_dir, "${path.module}/../../policies")
  bucket       = "${var.name}-access-logs-${data.aws_caller_identity.current.account_id}"
}

data "aws_caller_identity" "current" {}

# Where the state and trail buckets' S3 server access logs go: who read or wrote a state file
# or a trail log, and from where.
resource "aws_s3_bucket" "logs" {
  # checkov:skip=CKV_AWS_18:This is the access-log bucket; logging it into itself would log every log delivery, without end.
  # checkov:skip=CKV_AWS_145:S3 delivers server access logs only to buckets encrypted with S3-managed keys (SSE-S3), not SSE-KMS.
  # checkov:skip=CKV_AWS_144:Access logs expire after a year in the region they describe; a copy in a second region would outlive them for no reader.
  # checkov:skip=CKV2_AWS_62:Nothing consumes notifications of log deliveries.
  bucket = local.bucket
  tags   = local.tags
}

resource "aws_s3_bucket_versioning" "logs" {
  bucket = aws_s3_bucket.logs.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "logs" {
  bucket = aws_s3_bucket.logs.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_public_access_block" "logs" {
  bucket = aws_s3_bucket.logs.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_policy" "logs" {
  bucket = aws_s3_bucket.logs.id
  policy = templatefile("${local.policies_dir}/karrots-access-logs-bucket.json", {
    bucket     = local.bucket
    account_id = data.aws_caller_identity.current.account_id
  })
  depends_on = [aws_s3_bucket_public_access_block.logs]
}

resource "aws_s3_bucket_lifecycle_configuration" "logs" {
  bucket = aws_s3_bucket.logs.id

  rule {
    id     = "expire-access-logs"
    status = "Enabled"
    filter {}

    expiration {
      days = var.retention_days
    }

    noncurrent_version_expiration {
      noncurrent_days = 30
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  depends_on = [aws_s3_bucket_versioning.logs]
}
