variable "name" {
  type        = string
  description = "Prefix of the trail and its bucket; must start with karrots-."

  validation {
    condition     = can(regex("^karrots-[a-z0-9-]{1,32}$", var.name))
    error_message = "name must be karrots- followed by lowercase letters, digits and '-'."
  }
}

variable "policies_dir" {
  type        = string
  description = "Folder of the IAM policy documents; default: the config repository's policies/."
  default     = null
}

variable "tags" {
  type        = map(string)
  description = "Tags merged into every resource."
  default     = {}
}

variable "kms_key_arn" {
  type        = string
  description = "The KMS key that encrypts the trail, its bucket and its log group."
}

variable "access_log_bucket" {
  type        = string
  description = "The bucket the trail bucket's S3 server access logs go to."
}

variable "retention_days" {
  type        = number
  description = "Days trail logs are kept, in the bucket and in CloudWatch Logs."
  default     = 365
}

variable "permissions_boundary" {
  type        = string
  description = "ARN of the permissions boundary the CloudTrail log-delivery role carries; null for none."
  default     = null
}
